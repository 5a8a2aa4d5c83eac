"""What a method is: its config, what statistics it needs, and the record it returns per module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Compressed:
    """The result of compressing one Linear. Everything export and the report need; no file format."""

    name: str                       # module path, e.g. "model.layers.0.mlp.down_proj"
    method: str                     # registry key, e.g. "gptq"
    bits: int
    layout: str                     # "oc" | "ic"
    group_size: int                 # -1 = one group over the whole grouped dimension
    symmetric: bool
    codes: torch.Tensor             # int8 [OC, IC], signed
    scale: torch.Tensor             # fp32 holding scale_dtype values; [OC, G] ("oc") or [G, IC] ("ic")
    zero: torch.Tensor | None       # same shape as scale, integer-valued; None if symmetric
    W_hat: torch.Tensor | None      # fp32 [OC, IC] dequantized weight; the engine puts it into the model, then drops it
    loss: float | None = None       # method's own objective (GPTQ: sum of squared weighted error)
    info: dict = field(default_factory=dict)  # method notes for the report (damping used, fallback, ...)
    error_trace: float | None = None  # tr(ΔW H ΔWᵀ) for the H it solved on, if the method knows it (GPTQ)


@dataclass
class Adapter:
    """A low-rank side path for one Linear: y = x Ŵᵀ + (x Aᵀ) Bᵀ. Exported as a PEFT LoRA adapter."""

    name: str
    method: str
    A: torch.Tensor                 # fp32 [r, IC]
    B: torch.Tensor                 # fp32 [OC, r]
    info: dict = field(default_factory=dict)
    W_base: torch.Tensor | None = None   # a new base weight (CorDA's residual W − B·A); None keeps the current one

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class Replaced:
    """A Linear's weight replaced by another dense weight (pruning). Stored as it is, unpacked."""

    name: str
    method: str
    W_new: torch.Tensor             # fp32 [OC, IC]
    info: dict = field(default_factory=dict)


@dataclass
class Packed:
    """A module stored in calq's own format: what compressed-tensors cannot express (PTQ1.61's sign bits and
    column mask, Quamba's activation scales). The writer stores `tensors` as `{name}.{key}` and `meta` in
    config.json; on load the method's `rebuild` turns them back into the module."""

    name: str
    method: str
    tensors: dict[str, torch.Tensor]
    meta: dict                      # JSON-serialisable
    n_weights: int                  # weights the record stands for (the bits/weight denominator)
    bits: int = 16                  # nominal bits for the report's table (e.g. 1 for binarized)
    layout: str = ""
    W_hat: torch.Tensor | None = None    # a Linear's new dense weight, which the engine installs
    module: nn.Module | None = None      # or a whole replacement submodule
    replaces: tuple[str, ...] | None = ("weight",)   # state keys under `name` it stands in for; None: all
    info: dict = field(default_factory=dict)
