"""Adapters as a side path on a Linear during calibration: y = x Wᵀ (+ b) + (x Aᵀ) Bᵀ.

A and B are non-persistent buffers, so they move with the block between CPU and device but never enter
state_dict (export writes them to the PEFT folder instead), and later stages still see and compress the base
weight alone: CorDA's residual is quantized, not residual + B·A.
"""

from __future__ import annotations

import torch
from torch import nn


def _lora_forward(mod: nn.Linear, args, out):
    x = args[0]
    return out + ((x.to(mod.calq_lora_A.dtype) @ mod.calq_lora_A.t()) @ mod.calq_lora_B.t()).to(out.dtype)


def attach_adapter(mod: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
    if hasattr(mod, "calq_lora_A"):
        raise ValueError("a Linear takes one adapter; two compensation stages target the same module")
    mod.register_buffer("calq_lora_A", A.to(mod.weight.device, mod.weight.dtype), persistent=False)
    mod.register_buffer("calq_lora_B", B.to(mod.weight.device, mod.weight.dtype), persistent=False)
    mod.register_forward_hook(_lora_forward)
