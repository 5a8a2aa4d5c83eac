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
  - `effect`: what it leaves of a Linear, which decides the stage orders a checkpoint can hold (`order_problem`);
  - optionally `check_shape`, `compensates`, `calibrate_on`, `robust_statistics`, `adapters` and `fallback`
    (below).
The engine never branches on a method's name; everything it needs is declared here.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: str
    num_samples: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=8)
    seed: int | None = Field(None, ge=0, lt=2**63)     # torch's generator takes 64 bits; Random(-s) == Random(s)


class StageConfig(BaseModel):
    """Keys every stage has. `targets`/`ignore`: class names, exact module paths or `re:` regexes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    calibration: StageCalibration | None = None

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes_compile(cls, v):
        for t in v:
            if t.startswith("re:"):
                check_regex(t[3:])
        return v


# GGUF block formats a stage can target: what they fix (export/gguf.py writes the codes as they are)
SCHEMES = {"q4_0": {"bits": 4, "group_size": 32, "symmetric": True, "layout": "oc"},
           "q4_1": {"bits": 4, "group_size": 32, "symmetric": False, "layout": "oc"},
           "q8_0": {"bits": 8, "group_size": 32, "symmetric": True, "layout": "oc"}}


def check_regex(pattern: str) -> None:
    """A recipe's regex compiles (else a ValueError that validation reports with the key's path)."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"bad regex {pattern!r}: {e}") from None


class WeightQuantConfig(StageConfig):
    """Integer weight quantization keys shared by RTN and GPTQ (llm-compressor's names)."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int = 128
    symmetric: bool = True
    layout: Literal["oc", "ic", "adadim"] = "oc"   # adadim: per Linear, whichever has the lower unit error
    # A GGUF block format: sets the keys above and llama.cpp's scale rule (quantizer.py), so that
    # `calq export --format gguf` writes exactly the codes this stage chose, with no rounding of its own.
    scheme: Literal["q4_0", "q4_1", "q8_0"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _scheme(cls, data):
        if isinstance(data, dict) and data.get("scheme") in SCHEMES:
            fixed = SCHEMES[data["scheme"]]
            for k, v in fixed.items():
                if k in data and data[k] != v:
                    raise ValueError(f"scheme {data['scheme']} sets {k}: {v}; leave {k} out")
            data = {**data, **fixed}
        return data

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
    # "quantize": stored codes (Compressed, Packed); "prune": a dense weight (Replaced); "adapter": a side path
    # beside the weight (EoRA); "adapter+base": a side path and a new dense base weight (CorDA's residual)
    effect: str = "quantize"
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


def order_problem(stages: list[Method]) -> tuple[int, str, str] | None:
    """Why these stages, in this order, cannot all act on one Linear: (index of the stage at fault, problem, fix),
    or None. A checkpoint stores one weight per Linear (quantized codes or a dense tensor) and one adapter, so what
    a later stage does to the weight must be what gets stored."""
    quantized = adapter = None
    for i, m in enumerate(stages):
        if m.effect == "quantize" and quantized is not None:
            return i, f"{quantized.name} then {m.name} quantize the same weight twice", \
                "quantize each Linear once: give the stages disjoint targets/ignore, or drop one"
        if m.effect.startswith("adapter") and adapter is not None:
            return i, f"{adapter.name} then {m.name} both add an adapter, and a Linear carries one", \
                "keep one adapter stage per Linear, or give them disjoint targets/ignore"
        if m.effect in ("prune", "adapter+base") and quantized is not None:
            return i, f"{m.name} after {quantized.name} changes a weight the checkpoint stores as " \
                f"{quantized.name}'s codes, so the change would be lost", \
                f"put {m.name} before {quantized.name}" + (" (or compensate with eora)" if m.effect != "prune" else "")
        if m.effect == "quantize":
            quantized = m
        elif m.effect.startswith("adapter"):
            adapter = m
    return None
