"""The method registry and the contract between the engine and a method.

A method declares:
  - `Config`: its pydantic recipe keys (extra keys rejected);
  - `needs`: what the engine must provide per Linear before `apply` (STATS below; "hessian", H = 2/N XᵀX, is
    always collected since the report's rel_error uses it; "unit" is a `unit_errors(candidates)` function
    scoring candidate weights on the Linear's evaluation unit, calibration/units.py);
  - `apply(name, W, stats)`: what it does to one Linear's weight W [OC, IC], returned as a `Compressed`
    (packed codes), an `Adapter` (low-rank side path) or a `Replaced` (dense weight);
  - or, with `scope = "block"`, `apply_block(ctx)`: what it does to a whole block given its inputs and the
    full-precision targets (block-wise training, PTQ1.61; module replacement, Quamba), returning records
    (`Packed` for calq's own storage, which `rebuild` reads back);
  - optionally `prepare(model, ctx)`: model-level work before the block loop (norm folding, rotations,
    PTQ1.61's preprocessing pass),
    and `model_records()`: `Packed` records of modules outside the blocks that `prepare` compressed and installed
    (Quamba2's embedding and lm_head), which join the block loop's records;
  - optionally `check_shape`, `compensates`, `calibrate_on`, `robust_statistics`, `adapters` and `fallback`
    (below).
The engine never branches on a method's name; everything it needs is declared here.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from calq.methods.base import Adapter, Compressed, Packed, Replaced

METHODS: dict[str, type[Method]] = {}
# What the engine knows how to provide. "original_weight": the Linear's weight before any stage touched it;
# "input_absmean": mean |x| per input channel [IC]; "input_absmax": max |x| per input channel [IC].
# "fp_path": the engine also carries the block inputs along the full-precision path (block methods' targets).
# "sample_covariance": Σ_s X̃_sᵀX̃_s / #samples with X̃_s = X_s / |max X_s| per calibration sample (CorDA).
# Always provided alongside "hessian": "hessian_diag_all", diag of H over every token (massive ones included).
STATS = ("hessian", "unit", "original_weight", "input_absmean", "input_absmax", "sample_covariance", "fp_path")


def register(name: str):
    def wrap(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


class StageCalibration(BaseModel):
    """Data for one stage's statistics instead of the recipe's: EoRA or CorDA on task text while GPTQ calibrates
    on general text. Unset keys take the recipe's `calibration` values."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    num_samples: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=8)
    seed: int | None = None


class StageConfig(BaseModel):
    """Keys every stage has. `targets`/`ignore`: class names, exact module paths or `re:` regexes."""

    model_config = ConfigDict(extra="forbid")

    method: str
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    calibration: StageCalibration | None = None

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes_compile(cls, v):
        for t in v:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {t!r}: {e}") from e
        return v


class WeightQuantConfig(StageConfig):
    """Integer weight quantization keys shared by RTN and GPTQ (llm-compressor's names)."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int = 128
    symmetric: bool = True
    layout: Literal["oc", "ic", "adadim"] = "oc"   # adadim: per Linear, whichever has the lower unit error

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v != -1 and v < 1:
            raise ValueError("must be -1 (one group per channel) or a positive size such as 32, 64, 128")
        return v


class Method:
    name: str = ""
    compensates: bool = False   # needs an earlier stage that compressed the same Linears (EoRA)
    # Whose inputs the statistics describe: the block as the earlier stages left it ("current"), or the block
    # with its original weights ("original": EoRA's reference code calibrates the uncompressed block), or the
    # original block on the full-precision path's inputs ("fp": PTQ1.61's statistics come from the FP model).
    calibrate_on: str = "current"
    scope: str = "linear"       # "block": the engine calls apply_block(ctx) instead of apply per Linear
    # True: "hessian" leaves out massive tokens (calibration.massive_token_ratio), for solvers that would otherwise
    # fit a handful of attention-sink tokens at every other token's cost (GPTQ, EoRA); False: every token counts,
    # as importance scores need (pruning masks, CorDA's covariance).
    robust_statistics: bool = False
    # Its records are Adapters (EoRA, CorDA): fused MoE experts, which a PEFT adapter cannot wrap, are left out.
    adapters: bool = False
    Config: type[StageConfig] = StageConfig
    needs: tuple[str, ...] = ()

    def __init__(self, config: StageConfig):
        self.config = config
        if not set(self.needs) <= set(STATS):
            raise ValueError(f"method {self.name!r} needs {set(self.needs) - set(STATS)}, unknown to the engine")

    @property
    def data_free(self) -> bool:
        """Works from the weights alone (RTN, magnitude pruning): the engine runs no calibration forward for it,
        and none at all when every stage is data-free; its per-layer error is then not measured."""
        return self.scope == "linear" and not self.needs and not self.compensates and self.calibrate_on == "current"

    def fallback(self, name: str, W: torch.Tensor, stats: dict) -> Compressed | Replaced | None:
        """A record for a target no calibration token reached (an expert the router never chose), from its weight
        alone (stats: scale_dtype); None leaves it as it is (the report says so)."""
        return None

    def check_shape(self, shape: tuple[int, int]) -> tuple[str, str] | None:
        """(recipe key, problem) if this stage's settings cannot apply to a Linear of shape [OC, IC], else None."""
        return None

    def prepare(self, model, ctx) -> None:
        """Model-level work before the block loop (default: none): exact transforms such as norm folding and
        rotations, or a first compression pass (PTQ1.61's preprocessing). ctx: engine.PrepareContext."""

    def model_records(self) -> list[Packed]:
        """Records of modules outside the repeated blocks that this method compressed itself (in `prepare`),
        already installed in the model; collected after the block loop (default: none)."""
        return []

    def apply_block(self, ctx) -> list[Compressed | Adapter | Replaced | Packed]:
        """scope "block": compress the block in ctx (calibration/engine.py BlockContext)."""
        raise NotImplementedError

    @classmethod
    def rebuild(cls, model, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        """From a `Packed` record read back from disk: install what the model needs at `name` and return the
        state-dict entries under it (e.g. {"weight": dequantized W})."""
        raise NotImplementedError(f"method {cls.name!r} stores no calq-packed modules")

    def apply(self, name: str, W: torch.Tensor, stats: dict) -> Compressed | Adapter | Replaced:
        """W is the Linear's current weight [OC, IC] (fp32 copy). A `Compressed` replaces it; an `Adapter`
        is added next to it (as a side path for the blocks that follow); `Replaced` swaps in a dense weight."""
        raise NotImplementedError
