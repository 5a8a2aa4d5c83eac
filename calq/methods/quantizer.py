"""Uniform integer quantization as pure functions, in the compressed-tensors integer convention.

Codes are signed, q in [-2^(b-1), 2^(b-1) - 1]; W_hat = (q - zero) * scale (formats.md §1.3).
Symmetric: scale = absmax / ((2^b - 1) / 2), zero = 0. Asymmetric: scale = (max - min) / (2^b - 1),
zero = round(qmin - min / scale), clamped, so 0.0 is always representable. scale_rule "gguf" takes llama.cpp's
rules instead, so GGUF blocks hold calq's codes as they are: 4-bit (Q4_0) scale = the group's signed max / -8
(the largest magnitude lands on -8 exactly; the scale may be negative), 8-bit (Q8_0) scale = absmax / 127;
asymmetric 4-bit (Q4_1, w = q·d + m with fp16 d and m) keeps calq's asymmetric grid with the scale rounded to
an fp16 whose 4 low mantissa bits are zero (7 significant bits), so that m = -(zero - qmin)·scale is an fp16 too
and llama.cpp's q·d + m is (q - zero)·scale bit for bit (`gguf_q4_1_scale`).
Scales are rounded to the checkpoint dtype *before* codes are computed, so dequantization on load
reproduces calibration-time fake quantization exactly.

Group layouts of a weight W [OC, IC]:
  "oc": groups of `g` consecutive input columns within one output row -> scale [OC, IC/g]
        (the usual layout; g = -1 means one group per row, i.e. per-channel -> scale [OC, 1])
  "ic": groups of `g` consecutive output rows within one input column -> scale [OC/g, IC]
        (per-input-channel; compressed-tensors `block` with block_structure [g, 1])
Each layout is the other on Wᵀ, so both go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("oc", "ic")


@dataclass(frozen=True)
class QuantArgs:
    bits: int = 4
    group_size: int = 128      # -1: one group spanning the whole grouped dimension
    symmetric: bool = True
    layout: str = "oc"
    scale_dtype: torch.dtype = torch.float16
    scale_rule: str = "range"  # "range" | "gguf" (module docstring)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group_len(self, W_shape: tuple[int, int]) -> int:
        """Length of one group along the grouped dimension (IC for "oc", OC for "ic")."""
        dim = W_shape[1] if self.layout == "oc" else W_shape[0]
        return dim if self.group_size == -1 else self.group_size


def qparams(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point reducing over the last dim of x [..., g]. Returns ([...], [...] or None)."""
    x = x.float()
    if args.symmetric:
        absmax = x.abs().amax(-1)
        if args.scale_rule == "gguf" and args.bits == 4:
            signed = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
            scale = signed / args.qmin
        elif args.scale_rule == "gguf":
            scale = absmax / args.qmax
        else:
            scale = absmax / ((2**args.bits - 1) / 2)
        return _round_scale(scale, args), None
    xmin = x.amin(-1).clamp(max=0.0)
    xmax = x.amax(-1).clamp(min=0.0)
    scale = (xmax - xmin) / (2**args.bits - 1)
    if args.scale_rule == "gguf":
        scale = gguf_q4_1_scale(scale)
    scale = _round_scale(scale, args)
    zero = torch.round(args.qmin - xmin / scale).clamp(args.qmin, args.qmax)
    return scale, zero


def gguf_q4_1_scale(scale: torch.Tensor) -> torch.Tensor:
    """The nearest fp16 with its 4 low mantissa bits zero, as fp32, in [2^-20, 4352]. Times any integer 0..15 it
    stays an exact fp16 (normal or subnormal; checked exhaustively in tests/methods/test_quantizer.py), so a
    Q4_1 block's min m = -z·d is exact; the price is a scale off by at most 2^-7 of itself."""
    bits = scale.clamp(min=0).to(torch.float16).view(torch.int16).int()
    # round half up in the bit pattern; 16 = 2^-20, the smallest such nonzero fp16 (a zero scale stays zero);
    # 0x6C40 = 4352, the largest whose 15 multiples stay finite
    bits = torch.where(scale > 0, ((bits + 8) & ~15).clamp(16, 0x6C40), 0)
    return bits.to(torch.int16).view(torch.float16).float()


def _round_scale(scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    # A zero scale (all-zero group) would divide by zero; any nonzero value codes it as 0.
    scale = scale.to(args.scale_dtype).float()
    return torch.where(scale != 0, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Integer codes of x (broadcasting scale/zero against x). Returned as float holding integers."""
    q = torch.round(x / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(args.qmin, args.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quantize(x, scale, zero, args: QuantArgs) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero, args), scale, zero)


def check_divides(W_shape: tuple[int, int], args: QuantArgs) -> str | None:
    """None if the group size divides the grouped dimension, else a message naming both numbers."""
    dim_name, dim = ("in_features", W_shape[1]) if args.layout == "oc" else ("out_features", W_shape[0])
    if args.group_size != -1 and dim % args.group_size:
        return f"{args.group_size} does not divide {dim_name} {dim}"
    return None


def quantize_rtn(W: torch.Tensor, args: QuantArgs):
    """Round-to-nearest of W [OC, IC] in args.layout. Returns (codes, scale, zero, W_hat).

    codes: int8 [OC, IC]; scale/zero: [OC, G] for "oc", [G, IC] for "ic" (zero None if symmetric).
    """
    if args.layout == "ic":
        codes, scale, zero, W_hat = quantize_rtn(W.t(), QuantArgs(**{**args.__dict__, "layout": "oc"}))
        return codes.t(), scale.t(), None if zero is None else zero.t(), W_hat.t()
    OC, IC = W.shape
    g = args.group_len(W.shape)
    Wg = W.float().reshape(OC, IC // g, g)                  # [OC, G, g]
    scale, zero = qparams(Wg, args)                        # [OC, G]
    z = None if zero is None else zero[..., None]
    q = quantize(Wg, scale[..., None], z, args)            # [OC, G, g]
    W_hat = dequantize(q, scale[..., None], z).reshape(OC, IC)
    return q.reshape(OC, IC).to(torch.int8), scale, zero, W_hat
