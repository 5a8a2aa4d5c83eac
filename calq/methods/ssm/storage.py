"""A quantized mixer as flat tensors + JSON meta (a `Packed` record), and back.

Per buffer of the mixer: a quantized weight is `{name}.codes` (int8; 4-bit codes packed two per byte as
`{name}.packed`, low nibble first, code + 8) and `{name}.scale` (fp32 scalar or per-segment vector at 8 bits,
fp16 [OC, IC/g] at 4 bits); anything else is stored as fp16 `{name}`; activation scales `s_{site}` as fp32.
Weights are stored already rotated (W_out·H_Eᵀ, residual Hadamard) and permuted (sort-and-cluster).
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from calq.methods.ssm.hadamard import hadamard
from calq.methods.ssm.plan import QuantPlan


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [−8, 7], last dim even → uint8 [..., n/2]."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = (packed & 0xF).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), -1).flatten(-2)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, segments: list[int] | None) -> torch.Tensor:
    """W_hat exactly as the quantizers computed it (weights.py)."""
    codes, scale = codes.float(), scale.float()
    if scale.dim() == 2:                                           # 4-bit groups [OC, G]
        OC, IC = codes.shape
        G = scale.shape[1]
        return (codes.reshape(OC, G, IC // G) * scale[..., None]).reshape(OC, IC)
    if segments is None:
        return codes * scale
    s_rows = scale.repeat_interleave(torch.tensor(segments)).reshape(-1, *[1] * (codes.dim() - 1))
    return codes * s_rows


def export_mixer(q, arch: str) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(tensors, meta, n_weights) of a finalized QMamba1Mixer / QMamba2Mixer."""
    tensors, bits, segments = {}, {}, {}
    n_weights = 0
    for name, buf in q.named_buffers():
        if name.startswith("s_"):
            tensors[name] = buf.float().clone()
            continue
        n_weights += buf.numel()
        qw = q.qweights.get(name)
        if qw is None:
            tensors[name] = buf.half()
            bits[name] = 16
            continue
        bits[name] = qw.bits
        if qw.bits == 4:
            tensors[f"{name}.packed"] = pack_int4(qw.codes)
            tensors[f"{name}.scale"] = qw.scale.half()
        else:
            tensors[f"{name}.codes"] = qw.codes
            tensors[f"{name}.scale"] = qw.scale.float().reshape(-1) if qw.scale.dim() else qw.scale.float()
            if qw.scale.dim():
                segments[name] = q.segments_of(name)
    # "bits"/"layout": the nominal precision `calq inspect` shows; "tensor_bits": what each tensor got
    meta = {"arch": arch, "plan": asdict(q.plan), "layer_idx": q.layer_idx, "bits": q.plan.w_bits,
            "layout": f"w{q.plan.w_bits}a{q.plan.a_bits}", "tensor_bits": bits, "segments": segments,
            "hadamard_y": q.had_y.meta() if q.had_y is not None else None,
            "percentile": q.plan.percentile if arch == "mamba1" else None}
    if getattr(q, "clusters", None) is not None:
        c = q.clusters
        tensors.update({"perm": c.perm.to(torch.int32), "head_perm": c.head_perm.to(torch.int32),
                        "head_ranges": c.head_ranges, "dim_ranges": c.dim_ranges})
    return tensors, meta, n_weights


def load_mixer(cls, hf_mixer, tensors: dict[str, torch.Tensor], meta: dict):
    """The quantized mixer rebuilt from `export_mixer`'s output, in "quant" mode."""
    had = None
    if meta["hadamard_y"] is not None:
        had = hadamard(meta["hadamard_y"]["n"])
        if had.meta() != meta["hadamard_y"]:
            raise ValueError(f"checkpoint Hadamard {meta['hadamard_y']} differs from this calq's {had.meta()}")
    q = cls(hf_mixer, QuantPlan(**meta["plan"]), had, mode="quant")
    q.prepare_rebuild()
    with torch.no_grad():
        for name, _ in list(q.named_buffers()):
            if name in tensors:
                setattr(q, name, tensors[name].float().clone())
            elif f"{name}.packed" in tensors:
                setattr(q, name, dequantize(unpack_int4(tensors[f"{name}.packed"]), tensors[f"{name}.scale"], None))
            else:
                setattr(q, name, dequantize(tensors[f"{name}.codes"], tensors[f"{name}.scale"],
                                            meta["segments"].get(name)))
    return q
