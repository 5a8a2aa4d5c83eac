"""The recipe: pydantic models with unknown keys rejected and errors that name the field path.

Shape (names follow llm-compressor where the meaning is the same, formats.md §4):
  model, calibration {dataset, num_samples, seq_len, seed, batch_size}, moe {calibrate_all_experts, min_tokens},
  stages: [{method, targets, ignore, <method keys>}], evaluation {datasets, seq_len, max_windows},
  output {format}, expect {max_ppl_ratio, max_bits_per_weight}.
Each stage is validated by its method's own Config, looked up by `method:` in the registry.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from calq.calibration.data import parse_dataset_spec
from calq.errors import CalqError, RecipeError
from calq.methods import METHODS
from calq.methods.registry import StageConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _check_spec(v: str) -> str:
    try:
        parse_dataset_spec(v)
    except CalqError as e:
        raise ValueError(f"{e.problem} ({e.fix})") from None
    return v


class Calibration(_Strict):
    dataset: str = "stdlib:train"
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = Field(0, ge=0, lt=2**63)    # torch's generator takes 64 bits; Random(-s) would equal Random(s)
    batch_size: int = Field(8, ge=1)
    # What the next block is fed: the compressed blocks' outputs (GPTQ) or the full-precision ones
    # (AdaDim's and AWQ's reference code).
    propagate: Literal["quantized", "fp"] = "quantized"
    # Tokens whose input energy ‖x‖² exceeds this multiple of the median token's are left out of every Linear's
    # Hessian, covariance and mean |x| (attention sinks with massive activations); null counts every token.
    massive_token_ratio: float | None = Field(1000.0, gt=1)

    _spec = field_validator("dataset")(classmethod(lambda cls, v: _check_spec(v)))


class MoE(_Strict):
    """Mixture-of-experts models: how each expert's statistics are gathered (calibration/moe.py)."""

    # Every token through every expert for the statistics (the block's output still follows the router), as
    # llm-compressor does; costs about n_experts / top_k times the experts' calibration compute.
    calibrate_all_experts: bool = False
    # An expert routed fewer tokens gets dampening_frac · mean(diag H) added to its Hessian; one routed none is
    # compressed by the method's data-free fallback (RTN for rtn/gptq), and the report records both.
    min_tokens: int = Field(128, ge=1)
    dampening_frac: float = Field(0.1, ge=0, le=10)
    # Experts calibrated per forward pass (null: all at once). The non-expert targets go first, then this many
    # experts at a time: RAM holds only their Hessians (Mixtral-8x7B: 8 × 0.8 GB for down_proj alone), at the
    # cost of one more calibration forward per pass; later passes see the earlier passes' compressed weights.
    experts_per_pass: int | None = Field(None, ge=1)


class Evaluation(_Strict):
    datasets: list[str] = Field(default_factory=lambda: ["stdlib:test"], min_length=1)   # none: use --no-eval
    seq_len: int = Field(512, ge=8)
    max_windows: int | None = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)

    @field_validator("datasets")
    @classmethod
    def _specs(cls, v):
        return [_check_spec(s) for s in v]


class Output(_Strict):
    # gguf: also write model.gguf for llama.cpp, its Linears as Q4_0/Q4_1/Q8_0 blocks holding the stages' own codes
    format: Literal["compressed-tensors", "gguf"] = "compressed-tensors"
    embeddings: Literal["q8_0", "f16", "f32"] = "q8_0"     # gguf only: token embedding and output head


class Expect(_Strict):
    """Turns a recipe into a regression test: `calq compress` exits 3 if a bound is missed."""

    max_ppl_ratio: float | None = Field(None, gt=0)        # compressed ppl / dense ppl, every dataset
    max_bits_per_weight: float | None = Field(None, gt=0)


class Recipe(_Strict):
    model: str = Field("zoo:llama", min_length=1)
    calibration: Calibration = Field(default_factory=Calibration)
    moe: MoE = Field(default_factory=MoE)
    stages: list[SerializeAsAny[StageConfig]] = Field(min_length=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: Output = Field(default_factory=Output)
    expect: Expect | None = None

    @model_validator(mode="after")
    def _gguf_stages(self):
        """Refuse before any work what a GGUF file cannot hold (export/gguf.py `module_blocks` checks the rest)."""
        if self.output.format != "gguf":
            return self
        for i, st in enumerate(self.stages):
            why = None
            if st.method not in ("rtn", "gptq", "prune"):
                why = f"{st.method} makes what llama.cpp's block formats cannot hold (adapters, calq's own formats)"
            elif st.method != "prune" and not st.symmetric and st.scheme != "q4_1":
                why = "GGUF holds asymmetric codes exactly only on scheme q4_1's grid (7-bit fp16 scales)"
            elif st.method != "prune" and (st.bits not in (4, 8) or st.layout != "oc"
                                           or (st.group_size != -1 and st.group_size % 32)):
                why = "GGUF holds symmetric 4- or 8-bit codes in groups of a multiple of 32 along inputs (layout oc)"
            if why:
                raise _StageError(i, "method" if st.method not in ("rtn", "gptq", "prune") else "scheme",
                                  f"output.format gguf: {why}; use scheme: q4_0, q4_1 or q8_0")
        return self

    @model_validator(mode="after")
    def _cache_stages(self):
        cache = [i for i, s in enumerate(self.stages) if METHODS[s.method].scope == "cache"]
        if len(cache) > 1:
            raise _StageError(cache[1], "method", "one KV-cache stage per recipe")
        for i in cache:
            if self.stages[i].calibration is not None:
                raise _StageError(i, "calibration", "a KV-cache stage uses no data")
        return self

    @model_validator(mode="after")
    def _stage_streams(self):
        if self.calibration.propagate == "fp" and any(s.calibration for s in self.stages):
            raise _StageError(next(i for i, s in enumerate(self.stages) if s.calibration), "calibration",
                              "per-stage data needs calibration.propagate: quantized")
        return self

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, v):
        if not isinstance(v, list):
            raise ValueError("must be a list of stages, each with a `method:`")
        out = []
        for i, stage in enumerate(v):
            if not isinstance(stage, dict) or "method" not in stage:
                raise _StageError(i, "method", "each stage needs a `method:` key "
                                  f"(one of {', '.join(sorted(METHODS))})")
            method = stage["method"]
            if not isinstance(method, str) or method not in METHODS:
                raise _StageError(i, "method", f"unknown method {method!r}; "
                                  f"available: {', '.join(sorted(METHODS))}")
            try:
                out.append(METHODS[method].Config.model_validate(stage))
            except ValidationError as e:
                err = e.errors()[0]
                raise _StageError(i, _path(err["loc"]), _message(err)) from None
            if METHODS[method].compensates and i == 0:
                raise _StageError(i, "method", f"{method} compensates an earlier compression stage; "
                                  "put a quantization stage (rtn, gptq) before it")
            if out[-1].calibration is not None:
                if METHODS[method].scope == "block":
                    raise _StageError(i, "calibration", f"{method} trains on the recipe's calibration stream; "
                                      "per-stage data is for rtn, gptq, prune, eora and corda")
                try:
                    _check_spec(out[-1].calibration.dataset)
                except ValueError as e:
                    raise _StageError(i, "calibration.dataset", str(e)) from None
        return out


class _StageError(ValueError):
    def __init__(self, index: int, field: str, msg: str):
        self.path = f"stages[{index}]" + (f".{field}" if field else "")
        super().__init__(msg)


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    return err["msg"].removeprefix("Value error, ")


def validate_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Recipe from parsed YAML, or a RecipeError naming `source`, the field path and the problem."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}",
                          "see docs/recipes.md for the keys")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _StageError):
            where, msg = ctx_err.path, str(ctx_err)
        else:
            where, msg = _path(err["loc"]), _message(err)
        raise RecipeError(f"{source}: {where}: {msg}",
                          "fix the recipe (keys are documented in docs/recipes.md)") from None
