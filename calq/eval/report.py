"""The run report: one pydantic model, written as report.json; report.md is rendered from that JSON only."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path

import torch
from pydantic import BaseModel, Field


class EvalResult(BaseModel):
    dataset: str
    seq_len: int
    windows: int
    baseline_ppl: float | None = None
    ppl: float


class ModuleRecord(BaseModel):
    name: str
    method: str
    bits: int
    layout: str
    group_size: int | None = None       # None: not a grouped integer format (e.g. PTQ1.61)
    symmetric: bool | None = None
    rel_error: float | None = None      # None: the record replaced a whole submodule, not one Linear
    bits_per_weight: float
    bytes: int
    seconds: float
    tokens: int
    excluded_tokens: int = 0            # massive tokens left out of its statistics (calibration.massive_token_ratio)
    info: dict = Field(default_factory=dict)


class AdapterRecord(BaseModel):
    name: str
    method: str
    rank: int
    rel_error_before: float            # compressed weight vs original, on calibration inputs
    rel_error_after: float             # compressed + B·A vs original
    info: dict = Field(default_factory=dict)


class Report(BaseModel):
    calq_version: str
    python: str
    torch: str
    transformers: str
    compressed_tensors: str
    platform: str
    model: str
    source: dict = Field(default_factory=dict)    # where the weights came from: format, path, GGUF type, sha256
    recipe: dict
    seed: int
    device: str
    offload: str = "cpu"               # where weights rested: cpu (RAM) or disk (one block at a time)
    data_free: bool = False            # every stage worked from the weights alone: no calibration forward ran
    resumed_blocks: int = 0            # blocks put back from an interrupted run's saved state (--resume)
    timings: dict                      # total, load, calibration, compress, write, evaluation; per_block
    peak_rss_bytes: int
    peak_cuda_bytes: int | None = None
    # predicted bytes per part (eval/memory.py) and the measured peak RSS at the end of each phase (cumulative)
    memory: dict = Field(default_factory=dict)
    bits_per_weight: float             # codes + scales + zeros over the compressed Linears (16 if none)
    checkpoint_bytes: int
    gguf_bytes: int | None = None      # model.gguf, when output.format is gguf
    dense_bytes: int
    quantized_weights: int             # number of weights in quantized Linears
    # every stored byte over every parameter: of the whole model, and of the repeated blocks (eval/accounting.py)
    bits_per_parameter: float | None = None
    bits_per_parameter_blocks: float | None = None
    parameters: int = 0
    block_parameters: int = 0
    untouched_weights: list[dict] = Field(default_factory=list)  # big block weights no stage touched (warnings)
    expert_tokens: dict = Field(default_factory=dict)   # MoE: experts module -> calibration tokens routed per expert
    evaluation: list[EvalResult] = Field(default_factory=list)
    evaluation_protocol: str = ""
    modules: list[ModuleRecord] = Field(default_factory=list)
    skipped_modules: list[dict] = Field(default_factory=list)   # targets left unquantized, with the reason
    adapters: list[AdapterRecord] = Field(default_factory=list)  # low-rank compensation (adapter/ folder)
    adapter_bytes: int = 0                       # as stored (PEFT, model dtype)
    adapter_packed_bytes: int | None = None      # if A/B were quantized (adapter_bits): their packed size
    bits_per_weight_with_adapters: float | None = None
    expect: dict | None = None         # the recipe's bounds and whether each held
    # a KV-cache stage (xquant): method, bits per layer, streams, bits per cached element, size vs fp16 KV
    # (kv_cache_ratio: exact, partial groups counted; _nominal: the spec's (b + 32/G)·width formula), factor_bytes
    kv_cache: dict | None = None


def versions() -> dict:
    import compressed_tensors
    import transformers

    from calq import __version__

    return {"calq_version": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__,
            "platform": platform.platform()}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux VmHWM: ru_maxrss also carries the RSS the parent had when
    it forked this process (kept across exec), so under a large parent (a test runner, a notebook) it lies."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def write_report(report: Report, out_dir: Path) -> None:
    from calq.eval.report_md import render_markdown

    data = report.model_dump(mode="json")
    (out_dir / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    render_markdown(data, out_dir)
