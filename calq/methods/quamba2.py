"""Quamba2 (Chiang et al., ICML 2025; ../shared/methods/quamba.md): W8A8, W4A8, W4A16 for Mamba1 and Mamba2.

On top of Quamba: norm folding and a Hadamard on the residual stream (`prepare`, exact in fp), GPTQ for 4-bit
in_proj/out_proj (groups of 128; Mamba1's x_proj 4-bit RTN), and for Mamba2 sort-and-cluster of the conv output x
(one scale per SSD group × head cluster × dim cluster) with per-state-group scales for B and C. W4A16 keeps
activations and the SSM parameters in fp16.

Optional head-to-toe (H2T, calq/methods/ssm/h2t.py): `embedding_bits: 8|4` quantizes the embedding per row
(symmetric, absmax: a flagged deviation from the reference code's signed row max); `lm_head: w8a8|w4a8` quantizes
lm_head's weight (int8 per tensor, or 4-bit groups of `group_size` with GPTQ) and its input to int8 with one
static scale. Both happen in `prepare`, after the norm folding and rotation: the embedding first (no calibration),
then lm_head, whose input scale and Hessian come from a forward of the model with the quantized embedding but
still full-precision blocks (the reference calibrates on the quantized model; calq's block loop has not run yet).
That forward holds the whole model on the device in fp32. The records reach the checkpoint via `model_records`
and count in the report's bits/weight like the mixers. Default null: both stay dense, as before.

Not implemented: the W4AX evolutionary per-block search and the W4A8 kernels' extra per-channel int8 scale.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from calq.methods.registry import Method, StageConfig, register
from calq.methods.ssm.apply import quantize_mixer, rebuild_mixer
from calq.methods.ssm.h2t import lm_head_inputs, quantize_embedding, quantize_lm_head, rebuild_h2t
from calq.methods.ssm.plan import QuantPlan
from calq.methods.ssm.rotate import fold_norms, rotate_residual, untie_lm_head

PRECISIONS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, 16)}


class Quamba2Config(StageConfig):
    targets: list[str] = Field(default_factory=lambda: ["in_proj"])
    precision: Literal["w8a8", "w4a8", "w4a16"] = "w8a8"
    percentile: float | None = Field(0.99999, gt=0, le=1)   # Mamba1's u; Mamba2 uses sort-and-cluster instead
    hadamard: bool = True                                  # rotate y before out_proj
    residual_hadamard: bool = True                         # fold norms, rotate the residual stream
    clusters: int = Field(4, ge=0, le=16)      # Mamba2 x: head and dim clusters per SSD group; 0 = one scale
    group_size: int = Field(128, ge=1)                     # 4-bit weight groups along the input dim
    gptq: bool = True                                      # 4-bit in/out_proj with GPTQ (false: RTN)
    dampening_frac: float = Field(0.01, gt=0)
    embedding_bits: Literal[8, 4] | None = None            # H2T: per-row int8/int4 embedding; null: dense
    lm_head: Literal["w8a8", "w4a8"] | None = None         # H2T: quantized lm_head with int8 input; null: dense


@register("quamba2")
class Quamba2(Method):
    Config = Quamba2Config
    scope = "block"

    def check_shape(self, shape):
        # 4-bit weights come in groups along the input dim; a width narrower than a group is one group per row
        # (x_proj), but a wider one that the group does not divide would silently become one too
        cfg = self.config
        four_bit = PRECISIONS[cfg.precision][0] == 4 or cfg.lm_head == "w4a8"
        if four_bit and shape[1] >= cfg.group_size and shape[1] % cfg.group_size:
            return "group_size", f"{cfg.group_size} does not divide in_features {shape[1]}"
        return None

    def prepare(self, model, ctx) -> None:
        if self.config.residual_hadamard:
            fold_norms(model)
            self.residual = rotate_residual(model)
        cfg = self.config
        self._model_records = []
        if cfg.embedding_bits is None and cfg.lm_head is None:
            return
        untie_lm_head(model)                        # (done already by fold_norms) the two get different codes
        if cfg.embedding_bits is not None:
            self._model_records.append(quantize_embedding(model, cfg.embedding_bits, self.name))
        if cfg.lm_head is not None:
            H, amax = lm_head_inputs(model, ctx.ids, ctx.device)
            self._model_records.append(quantize_lm_head(model, cfg.lm_head, H, amax, self.name, cfg.group_size,
                                                         cfg.gptq, cfg.dampening_frac))

    def model_records(self):
        return list(getattr(self, "_model_records", []))

    def apply_block(self, ctx):
        cfg = self.config
        w_bits, a_bits = PRECISIONS[cfg.precision]
        plan = QuantPlan(w_bits=w_bits, a_bits=a_bits, percentile=cfg.percentile, hadamard_y=cfg.hadamard,
                         group_size=cfg.group_size, gptq=cfg.gptq, dampening_frac=cfg.dampening_frac,
                         clusters=cfg.clusters)
        rec = quantize_mixer(ctx, plan, self.name, ("mamba1", "mamba2"))
        rec.meta["residual_hadamard"] = getattr(self, "residual", None)
        return [rec]

    @classmethod
    def rebuild(cls, model, name, tensors, meta):
        if meta.get("h2t"):
            return rebuild_h2t(model, name, tensors, meta)
        return rebuild_mixer(model, name, tensors, meta)
