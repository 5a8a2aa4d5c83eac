"""RTN: round-to-nearest weight quantization, the baseline every method is compared with."""

from __future__ import annotations

from dataclasses import replace

import torch

from calq.methods.adadim import choose_layout
from calq.methods.base import Compressed
from calq.methods.quantizer import QuantArgs, check_divides, quantize_rtn
from calq.methods.registry import Method, WeightQuantConfig, register


class RTNConfig(WeightQuantConfig):
    pass


def quant_args(cfg: WeightQuantConfig, scale_dtype: torch.dtype) -> QuantArgs:
    # "adadim" is decided per Linear; until then the layout is the usual one.
    layout = "oc" if cfg.layout == "adadim" else cfg.layout
    return QuantArgs(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, layout=layout,
                     scale_dtype=scale_dtype, scale_rule="gguf" if cfg.scheme else "range")


def resolve_layout(cfg: WeightQuantConfig, W: torch.Tensor, stats: dict) -> tuple[QuantArgs, dict]:
    """The QuantArgs for this Linear (AdaDim picks its layout here) and what to record about the choice."""
    args = quant_args(cfg, stats["scale_dtype"])
    if cfg.layout != "adadim":
        return args, {}
    layout, info = choose_layout(W, args, stats["unit_errors"])
    return replace(args, layout=layout), {"adadim": info}


class WeightQuantMethod(Method):
    @property
    def needs(self):
        return ("unit",) if self.config.layout == "adadim" else ()

    def fallback(self, name, W, stats) -> Compressed:
        # round to nearest in the stage's format; adadim's choice needs data, so the usual layout
        args = quant_args(self.config, stats["scale_dtype"])
        codes, scale, zero, W_hat = quantize_rtn(W, args)
        cfg = self.config
        return Compressed(name, "rtn", cfg.bits, args.layout, cfg.group_size, cfg.symmetric, codes, scale, zero,
                          W_hat, info={"fallback_from": self.name})

    def check_shape(self, shape):
        # adadim needs oc to divide; ic is only tried where it divides too (adadim.md pitfalls)
        msg = check_divides(shape, quant_args(self.config, torch.float16))
        return ("group_size", msg) if msg else None


@register("rtn")
class RTN(WeightQuantMethod):
    Config = RTNConfig

    def apply(self, name, W, stats) -> Compressed:
        cfg = self.config
        args, info = resolve_layout(cfg, W, stats)
        codes, scale, zero, W_hat = quantize_rtn(W, args)
        return Compressed(name, "rtn", cfg.bits, args.layout, cfg.group_size, cfg.symmetric,
                          codes, scale, zero, W_hat, info=info)
