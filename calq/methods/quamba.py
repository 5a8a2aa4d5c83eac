"""Quamba (Chiang et al., ICLR 2025; ../shared/methods/quamba.md): static W8A8 for Mamba1.

Static, symmetric, per-tensor int8 weights and activations at every quantization point of the Mamba1 block,
with two fixes: the scan input u is clipped at a calibrated percentile (EMA observer), and the scan output y is
rotated by an orthonormal Hadamard before quantization, the inverse fused into out_proj. Embedding and lm_head
stay fp16. Each block's mixer becomes a simulated quantized mixer (calq/methods/ssm/mamba1.py) stored in calq's
own format: int8 weights, activation scales, the Hadamard construction and the percentile.
`percentile: null` and `hadamard: false` give the ablation's naive static W8A8 (min-max everywhere).
"""

from __future__ import annotations

from pydantic import Field

from calq.methods.registry import Method, StageConfig, register
from calq.methods.ssm.apply import quantize_mixer, rebuild_mixer
from calq.methods.ssm.plan import QuantPlan


class QuambaConfig(StageConfig):
    # A block is quantized when its mixer's in_proj matches; the whole mixer is then replaced.
    targets: list[str] = Field(default_factory=lambda: ["in_proj"])
    percentile: float | None = Field(0.99999, gt=0, le=1)   # α for u; null = min-max (naive static W8A8)
    hadamard: bool = True                                  # rotate y before out_proj


@register("quamba")
class Quamba(Method):
    Config = QuambaConfig
    scope = "block"

    def apply_block(self, ctx):
        cfg = self.config
        plan = QuantPlan(w_bits=8, a_bits=8, percentile=cfg.percentile, hadamard_y=cfg.hadamard)
        return [quantize_mixer(ctx, plan, self.name, ("mamba1",))]

    @classmethod
    def rebuild(cls, model, name, tensors, meta):
        return rebuild_mixer(model, name, tensors, meta)
