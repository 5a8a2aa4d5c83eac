"""Quamba2's "head-to-toe" (H2T) quantization: the embedding and lm_head (quamba.md "Quamba2: extra steps" 7).

Embedding: per-row symmetric, 8 bits `s = absmax_row/127`, codes in [−127, 127]; or 4 bits `s = absmax_row/8`,
codes in [−8, 7] stored +8 two per byte (so a row's largest positive entry clips to 7·s, as in the spec).
Deviation, flagged in the spec: the reference code takes the signed row *max*; calq takes the row absmax.
Row scales are stored in fp16, and W_hat = codes·scale is computed from the fp16 values, so the checkpoint
reproduces the in-memory weights exactly.

lm_head: "w8a8" = int8 weight per tensor (`absmax/127`), "w4a8" = 4-bit groups of 128 input columns (GPTQ on
the lm_head inputs' Hessian, or RTN without one); in both its input (the final norm's output) is fake-quantized
to int8 with one static scale `s_in = absmax/127` calibrated on the calibration windows. `QuantLinear` holds
W_hat and s_in as fp32 buffers; in a checkpoint it is a `Packed` record rebuilt by `rebuild_h2t`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calq.methods.base import Packed
from calq.methods.gptq import accumulate_hessian
from calq.methods.ssm.observers import fake_quant
from calq.methods.ssm.storage import dequantize, pack_int4, unpack_int4
from calq.methods.ssm.weights import quant_groups_gptq, quant_groups_rtn, quant_per_tensor


class QuantLinear(nn.Module):
    """y = Q8(x; s_in)·W_hatᵀ: an int8-input Linear without bias (the Mamba lm_head has none)."""

    def __init__(self, W_hat: torch.Tensor, s_in: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = W_hat.shape[1], W_hat.shape[0]
        self.register_buffer("weight", W_hat.float().clone())
        self.register_buffer("s_in", s_in.float().clone().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quant(x.float(), self.s_in, 8)
        return F.linear(xq, self.weight.float()).to(x.dtype)


def quant_embedding(E: torch.Tensor, bits: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(stored tensors, W_hat fp32) of a per-row symmetric embedding quantization."""
    E = E.detach().float()
    div = 127.0 if bits == 8 else 8.0
    lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    amax = E.abs().amax(1, keepdim=True)
    scale = torch.where(amax > 0, amax / div, torch.ones_like(amax)).half()      # [V, 1], as stored
    s = scale.float()
    codes = torch.clamp(torch.round(E / s), lo, hi).to(torch.int8)
    W_hat = codes.float() * s
    tensors = {"weight.scale": scale.reshape(-1)}
    tensors.update({"weight.packed": pack_int4(codes)} if bits == 4 else {"weight.codes": codes})
    return tensors, W_hat


def embedding_from(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    codes = unpack_int4(tensors["weight.packed"]) if "weight.packed" in tensors else tensors["weight.codes"]
    return codes.float() * tensors["weight.scale"].float()[:, None]


@torch.no_grad()
def lm_head_inputs(model, ids: torch.Tensor, device, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(H = 2/N XᵀX, absmax of X) over the lm_head inputs X of `model` on the windows `ids`, in fp32."""
    state: dict = {"H": None, "n": 0, "amax": torch.zeros(())}

    def hook(_mod, args):
        X = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        state["H"], state["n"] = accumulate_hessian(state["H"], X, state["n"])
        state["amax"] = torch.maximum(state["amax"], X.abs().amax().cpu())

    dev0, dtype0 = next(model.parameters()).device, next(model.parameters()).dtype
    model.to(device, torch.float32)
    handle = model.lm_head.register_forward_pre_hook(hook)
    try:
        for batch in ids.split(batch_size):
            model(batch.to(device), use_cache=False)
    finally:
        handle.remove()
        model.to(dev0, dtype0)
    return state["H"].cpu(), state["amax"]


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


@torch.no_grad()
def quantize_embedding(model, bits: int, method: str) -> Packed:
    emb = model.get_input_embeddings()
    tensors, W_hat = quant_embedding(emb.weight.data, bits)
    emb.weight.data.copy_(W_hat.to(emb.weight.dtype))
    return Packed(name=_module_name(model, emb), method=method, tensors=tensors,
                  meta={"h2t": "embedding", "bits": bits, "layout": f"row{bits}", "shape": list(W_hat.shape)},
                  n_weights=W_hat.numel(), bits=bits, layout=f"row{bits}", replaces=("weight",),
                  info={"h2t": "embedding"})


@torch.no_grad()
def quantize_lm_head(model, precision: str, H: torch.Tensor | None, amax: torch.Tensor, method: str,
                     group_size: int = 128, gptq: bool = True, dampening_frac: float = 0.01) -> Packed:
    """Replace model.lm_head by a QuantLinear; H None (or gptq False) quantizes a 4-bit weight with RTN."""
    lin = model.lm_head
    if getattr(lin, "bias", None) is not None:
        raise ValueError("H2T lm_head quantization expects an lm_head without bias")
    W = lin.weight.data.float()
    if precision == "w8a8":
        qw = quant_per_tensor(W, 8)
        tensors = {"weight.codes": qw.codes, "weight.scale": qw.scale.float()}
    else:
        qw = quant_groups_gptq(W, H, 4, group_size, dampening_frac) if gptq and H is not None \
            else quant_groups_rtn(W, 4, group_size)
        tensors = {"weight.packed": pack_int4(qw.codes), "weight.scale": qw.scale.half()}
    s_in = (amax.float() / 127).clamp_min(1e-12).reshape(())
    tensors["s_in"] = s_in.clone()
    W_hat = lm_head_weight(tensors)
    model.lm_head = QuantLinear(W_hat, s_in)
    bits = 8 if precision == "w8a8" else 4
    return Packed(name="lm_head", method=method, tensors=tensors,
                  meta={"h2t": "lm_head", "bits": bits, "layout": precision, "shape": list(W.shape)},
                  n_weights=W.numel(), bits=bits, layout=precision, replaces=None,
                  info={"h2t": "lm_head", "s_in": float(s_in), "gptq": bool(precision == "w4a8" and gptq
                                                                             and H is not None)})


def lm_head_weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if "weight.packed" in tensors:
        return dequantize(unpack_int4(tensors["weight.packed"]), tensors["weight.scale"], None)
    return dequantize(tensors["weight.codes"], tensors["weight.scale"], None)


def rebuild_h2t(model, name: str, tensors: dict, meta: dict) -> dict:
    """calq.load: state-dict entries (and for lm_head the QuantLinear) of an H2T record."""
    if meta["h2t"] == "embedding":
        return {"weight": embedding_from(tensors)}
    q = QuantLinear(lm_head_weight(tensors), tensors["s_in"].float())
    model.set_submodule(name, q)
    return dict(q.state_dict())
