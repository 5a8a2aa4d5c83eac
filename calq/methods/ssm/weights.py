"""Weight quantizers for Quamba/Quamba2: int8 per-tensor, and 4-bit per-128-group (RTN or GPTQ).

8-bit: s = absmax/127 per tensor (A_log, D, dt_bias, conv weight and bias each get their own), codes int8.
4-bit: the core's symmetric "oc" groups (scale = absmax/7.5, q ∈ [−8, 7], fp16 scales), i.e. Quamba2's
`2·absmax/15` step, via `calq.methods.gptq.gptq_quantize` or `quantize_rtn`. Each returns the codes, the scale
and W_hat = codes·scale, which the simulated mixer uses in place of the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calq.methods.gptq import gptq_quantize
from calq.methods.quantizer import QuantArgs, quantize_rtn
from calq.methods.ssm.observers import qmax, scale_from


@dataclass
class QWeight:
    codes: torch.Tensor          # int8, the weight's shape (4-bit codes are packed only when written)
    scale: torch.Tensor          # fp32 scalar (8-bit per-tensor) or [OC, IC/g] (4-bit groups)
    bits: int
    W_hat: torch.Tensor          # fp32 dequantized weight


def quant_per_tensor(W: torch.Tensor, bits: int = 8, segments: list[int] | None = None) -> QWeight:
    """One scale for W, or one per row segment (Mamba2's in_proj z|x|B|C|dt, conv x|B|C): scale [S]."""
    W = W.float()
    if segments is None:
        s = scale_from(W.abs().amax(), bits)
        s_rows = s
    else:
        s = torch.stack([scale_from(part.abs().amax(), bits) for part in W.split(segments)])     # [S]
        s_rows = s.repeat_interleave(torch.tensor(segments)).reshape(-1, *[1] * (W.dim() - 1))
    codes = torch.clamp(torch.round(W / s_rows), -qmax(bits) - 1, qmax(bits))
    return QWeight(codes.to(torch.int8), s, bits, codes * s_rows)


def group_args(bits: int, group_size: int, IC: int) -> QuantArgs:
    g = group_size if IC % group_size == 0 else -1   # a width below/indivisible by g: one group per row
    return QuantArgs(bits=bits, group_size=g, symmetric=True, layout="oc", scale_dtype=torch.float16)


def quant_groups_rtn(W: torch.Tensor, bits: int = 4, group_size: int = 128) -> QWeight:
    codes, scale, _, W_hat = quantize_rtn(W.float(), group_args(bits, group_size, W.shape[1]))
    return QWeight(codes, scale, bits, W_hat)


def quant_groups_gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                      dampening_frac: float = 0.01) -> QWeight:
    """Quamba2's GPTQ: damp 0.01, no act-order, groups of 128 input columns."""
    r = gptq_quantize(W.float(), H, group_args(bits, group_size, W.shape[1]), dampening_frac=dampening_frac)
    return QWeight(r.codes, r.scale, bits, r.W_hat)
