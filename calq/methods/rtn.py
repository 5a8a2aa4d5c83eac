"""RTN: round-to-nearest weight quantization, the baseline every method is compared with."""

from __future__ import annotations

import torch

from calq.methods.base import Compressed
from calq.methods.quantizer import QuantArgs, quantize_rtn
from calq.methods.registry import Method, WeightQuantConfig, register


class RTNConfig(WeightQuantConfig):
    pass


def quant_args(cfg: WeightQuantConfig, scale_dtype: torch.dtype) -> QuantArgs:
    return QuantArgs(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, layout=cfg.layout,
                     scale_dtype=scale_dtype)


@register("rtn")
class RTN(Method):
    Config = RTNConfig
    needs = ()

    def apply(self, name, W, stats) -> Compressed:
        cfg = self.config
        codes, scale, zero, W_hat = quantize_rtn(W, quant_args(cfg, stats["scale_dtype"]))
        return Compressed(name, "rtn", cfg.bits, cfg.layout, cfg.group_size, cfg.symmetric,
                          codes, scale, zero, W_hat)
