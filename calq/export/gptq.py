"""Convert a compressed-tensors checkpoint into the GPTQ layout (formats.md §2) for AutoGPTQ/GPTQModel-style loaders.

Per quantized Linear `<p>` (W [OC, IC], G groups along IC):
  qweight  int32 [IC·b/32, OC]   unsigned codes q = c + 2^(b-1), packed along the input dim
  qzeros   int32 [G, OC·b/32]    z − 1 (checkpoint_format "gptq", v1), packed along the output dim
  scales   fp16  [G, OC]
  g_idx    int32 [IC]            i // group_size (static act-order needs no permutation)
so W = scales[g_idx] · (q − z) is exactly the CT weight (c − zp) · scale. Both packings are one little-endian
bit stream per column: value i at bit i·b, which is also the 10|1|10|1|10 split of 3-bit GPTQ. Only what GPTQ
can express converts: per-output-channel groups with one bits/group_size/symmetric for every module; per-IC
blocks, calq-packed methods and v1-unstorable zero points are refused with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from calq.calibration.experts import CheckpointNames
from calq.errors import CalqError, ModelError
from calq.export.ct import _unpack_zero, ct_dequantize
from calq.export.peft import check_adapter
from calq.export.qconfig import DAMAGED
from calq.export.reader import INDEX, CheckpointReader, _scheme_for, check_ct_tensors, dense_config, module_at
from calq.export.staging import staged
from calq.export.writer import tied_output_key
from calq.files import open_safetensors, read_json

_CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
_MODEL_FILES = ("config.json", "quantize_config.json", INDEX)


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [N, M] (< 2^bits) -> int32 [N·bits/32, M]: column j is one little-endian bit stream."""
    N, M = values.shape
    if (N * bits) % 32:
        raise ValueError(f"{N} values of {bits} bits do not fill whole 32-bit words")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = (values.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 1   # [N, bits, M]
    stream = stream.reshape(N * bits // 32, 32, M)
    words = (stream << torch.arange(32, dtype=torch.int64)[None, :, None]).sum(1)  # [W, M] in 0..2^32-1
    return (words - (words >> 31) * (1 << 32)).to(torch.int32)                    # same bits, as int32


def unpack_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_stream: int32 [n·bits/32, M] -> int64 [n, M]."""
    W, M = words.shape
    stream = (words.to(torch.int64)[:, None, :] >> torch.arange(32)[None, :, None]) & 1    # [W, 32, M]
    stream = stream.reshape(n, bits, M)
    return (stream << torch.arange(bits)[None, :, None]).sum(1)


def gptq_dequantize(t: dict[str, torch.Tensor], bits: int, OC: int, IC: int, zero_offset: int = 1) -> torch.Tensor:
    """fp32 W [OC, IC] from one module's GPTQ tensors; zero_offset 1 for v1 ("gptq": z − 1 stored), 0 for v2.
    g_idx may be permuted (desc_act); without one, groups are consecutive."""
    q = unpack_stream(t["qweight"], bits, IC)                                   # [IC, OC]
    z = unpack_stream(t["qzeros"].t().contiguous(), bits, OC).t() + zero_offset  # [G, OC]
    g = t["g_idx"].long() if "g_idx" in t else torch.arange(IC) // (IC // t["scales"].shape[0])
    return ((q - z[g]).float() * t["scales"].float()[g]).t()


def _gptq_tensors(ct: dict[str, torch.Tensor], scheme: dict) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    b = scheme["num_bits"]
    OC, IC = ct["weight_shape"].tolist()
    c = unpack_from_int32(ct["weight_packed"], b, torch.Size([OC, IC])).long()   # signed codes
    scale = ct["weight_scale"]                                                     # [OC, G]
    G = scale.shape[1]
    if scheme["symmetric"]:
        zp = torch.zeros(OC, G, dtype=torch.long)
    else:
        zp = _unpack_zero(ct["weight_zero_point"], b, torch.Size([OC, G])).long()
    off = 1 << (b - 1)
    stored_zero = zp + off - 1                                                     # v1 stores z − 1
    if (stored_zero < 0).any():
        raise ValueError("a zero point at the bottom of the range (z = 0) cannot be stored as z − 1 in GPTQ v1")
    g = IC // G
    return {"qweight": pack_stream((c + off).t(), b),                              # [IC·b/32, OC]
            "qzeros": pack_stream(stored_zero, b).t().contiguous(),                # [G, OC·b/32]
            "scales": scale.t().to(torch.float16).contiguous(),                     # [G, OC]
            "g_idx": (torch.arange(IC) // g).to(torch.int32)}


def _check_scheme(name: str, scheme: dict, shape: tuple[int, int], uniform: dict) -> None:
    if scheme.get("strategy") not in ("group", "channel") or scheme.get("actorder") not in (None, "static"):
        raise CalqError(f"{name} is stored as a {scheme.get('strategy')} scheme; GPTQ has only per-output-channel "
                        "groups", "export recipes without layout: ic / adadim, or keep compressed-tensors")
    key = {k: scheme[k] for k in ("num_bits", "symmetric")} | {
        "group_size": scheme["group_size"] if scheme["strategy"] == "group" else -1}
    if uniform.setdefault("scheme", key) != key:
        raise CalqError(f"{name} has {key}, another module {uniform['scheme']}; a GPTQ config has one of each",
                        "use one bits/group_size/symmetric for every module, or keep compressed-tensors")
    OC, IC = shape
    b = key["num_bits"]
    if (IC * b) % 32 or (OC * b) % 32:
        raise CalqError(f"{name}: {OC}x{IC} at {b} bits does not fill whole 32-bit words along both dims",
                        "keep compressed-tensors for this model")


def export_gptq(src: str | Path, dst: str | Path, overwrite: bool = False) -> dict:
    """Write the GPTQ v1 form of the calq checkpoint src into dst; returns the GPTQ quantization_config."""
    from calq.calibration.offload import empty_model

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise CalqError(f"{src} is not a checkpoint folder (no config.json)", "pass the output folder of compress")
    config, qconfig = dense_config(src)
    if not qconfig or qconfig.get("quant_method") != "compressed-tensors":
        method = (qconfig or {}).get("quant_method", "none (a dense model)")
        raise CalqError(f"{src} has quant_method {method}; only compressed-tensors checkpoints convert to GPTQ",
                        "GPTQ cannot express calq's own formats (PTQ1.61, Quamba); keep the calq checkpoint")
    model = empty_model(config, torch.float16)
    reader = CheckpointReader(src)          # every header and the index, checked
    _check_keys(src, model, reader.files)
    if reader.adapter is not None:
        check_adapter(reader.adapter)
    files = sorted({src / f for f in reader.files.values()})
    with staged(dst, overwrite) as tmp:
        uniform: dict = {}
        weight_map = {}
        for f in files:
            with open_safetensors(f) as st:
                keys = list(st.keys())
                out = {k: st.get_tensor(k) for k in keys if not k.endswith(_CT_SUFFIXES)}
                for k in [k for k in keys if k.endswith(".weight_packed")]:
                    name = k[: -len(".weight_packed")]
                    ct = {s: st.get_tensor(f"{name}.{s}") for s in _CT_SUFFIXES if f"{name}.{s}" in keys}
                    scheme = _scheme_for(name, module_at(model, name), qconfig)
                    # an expert projection fused in the model has no module: the fused shape is checked on load
                    check_ct_tensors(name, ct, scheme, reader.linear_shape(model, name, ct["weight_shape"].tolist()
                                                                            if "weight_shape" in ct else None))
                    _check_scheme(name, scheme, tuple(ct["weight_shape"].tolist()), uniform)
                    try:
                        gq = _gptq_tensors(ct, scheme)
                    except ValueError as e:
                        raise CalqError(f"{name}: {e}", "quantize with symmetric: true, or keep "
                                        "compressed-tensors") from e
                    # the packing is exact: the loader will see the very weight calq evaluated
                    OC, IC = ct["weight_shape"].tolist()
                    if not torch.equal(gptq_dequantize(gq, scheme["num_bits"], OC, IC), ct_dequantize(ct, scheme)):
                        raise CalqError(f"{name}: GPTQ repacking is not exact", "report this as a calq bug")
                    out |= {f"{name}.{s}": v for s, v in gq.items()}
            save_file(out, tmp / f.name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(out, f.name)
        if not uniform:
            raise CalqError(f"{src} has no quantized Linear", "export the output of a rtn or gptq recipe")
        s = uniform["scheme"]
        gcfg = {"quant_method": "gptq", "bits": s["num_bits"], "group_size": s["group_size"], "desc_act": False,
                "sym": s["symmetric"], "lm_head": False, "checkpoint_format": "gptq", "format": "gptq",
                "pack_dtype": "int32", "true_sequential": True, "static_groups": False,
                "meta": {"quantizer": [f"calq:{_version()}"]}}
        cfg = read_json(src / "config.json")
        cfg["quantization_config"] = gcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(gcfg, indent=2, sort_keys=True) + "\n")
        if len(files) > 1:
            total = sum((tmp / f.name).stat().st_size for f in files)
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
        for p in src.iterdir():       # tokenizer, recipe, report, adapter/: everything but the weights
            if p.suffix != ".safetensors" and p.name not in _MODEL_FILES:
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
    return gcfg


def _check_keys(src: Path, model, files: dict[str, str]) -> None:
    """The checkpoint holds exactly the architecture's tensors (packed ones as CT names): export copies the
    others as they are, so a missing or foreign one would pass silently into the GPTQ checkpoint."""
    stored = {k.removesuffix(".weight_packed") + ".weight" if k.endswith(".weight_packed") else k
              for k in files if not k.endswith(_CT_SUFFIXES[1:])}
    names = CheckpointNames(model)      # fused MoE experts are stored one tensor per expert, under hub names
    keys = [k for k in model.state_dict() if k not in names.fused]
    keys += [f"{n}.weight" for fp in names.fused.values() for n, _, _ in fp.names()]
    tied = tied_output_key(model)
    expected = set(names.to_checkpoint(dict.fromkeys(keys))) - set(names.to_checkpoint(dict.fromkeys([tied] if tied
                                                                                                   else [])))
    if stored != expected:
        raise ModelError(f"{src} does not match its architecture: missing {sorted(expected - stored)[:3]}, "
                         f"unexpected {sorted(stored - expected)[:3]}", DAMAGED)


def _version() -> str:
    from calq import __version__

    return __version__
