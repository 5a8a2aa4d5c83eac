"""The compress report, assembled from what each phase of a run measured."""

from __future__ import annotations

import torch

from calq.eval.report import AdapterRecord, EvalResult, ModuleRecord, Report, peak_rss_bytes, versions
from calq.methods import METHODS
from calq.methods.base import Packed
from calq.recipe.schema import Recipe

PROTOCOL = ("GPTQ protocol: text joined once, tokenized once, non-overlapping windows (tail dropped), "
            "fp32 loss, ppl = exp(mean window loss)")


def _n_weights(rec) -> int:
    return rec.n_weights if isinstance(rec, Packed) else rec.codes.numel()


def evaluation_results(recipe: Recipe, after: dict, baseline: dict) -> list[EvalResult]:
    return [EvalResult(dataset=s, seq_len=recipe.evaluation.seq_len, windows=n, ppl=p, baseline_ppl=baseline[s][1])
            for s, (n, p) in after.items()]


def build_report(recipe: Recipe, run: dict, result, stats: dict, evals: list[EvalResult]) -> Report:
    """run: source, device, offload, timings, peaks, predicted memory, accounting, kv_cache record, adapter_bytes,
    resumed_blocks."""
    # Over every Linear a stage replaced: packed bytes where quantized, fp16 where only pruned.
    quantized = {m.record.name for m in result.modules}
    dense_only = [m for m in result.replaced if m.record.name not in quantized]
    n_weights = sum(_n_weights(m.record) for m in result.modules) + \
        sum(stats["dense_sizes"][m.record.name] for m in dense_only)
    q_bytes = sum(stats["modules"][m.record.name]["bytes"] for m in result.modules) + \
        sum(2 * stats["dense_sizes"][m.record.name] for m in dense_only)
    adapter_bytes = run["adapter_bytes"]
    report = Report(
        **versions(), model=recipe.model, source=run["source"], recipe=recipe.model_dump(mode="json"),
        seed=recipe.calibration.seed, device=str(run["device"]), offload=run["offload"],
        resumed_blocks=run.get("resumed_blocks", 0),
        data_free=all(METHODS[s.method](s).data_free for s in recipe.stages),
        timings={k: (round(v, 3) if isinstance(v, float) else v) for k, v in run["timings"].items()},
        peak_rss_bytes=peak_rss_bytes(), memory={"predicted": run["predicted"], "peak_rss_after": run["peaks"]},
        peak_cuda_bytes=torch.cuda.max_memory_allocated() if run["device"].type == "cuda" else None,
        skipped_modules=result.skipped, bits_per_weight=8 * q_bytes / n_weights if n_weights else 16.0,
        adapter_bytes=adapter_bytes,
        adapter_packed_bytes=sum(a.adapter.info["packed_bytes"] for a in result.adapters)
        if result.adapters and "packed_bytes" in result.adapters[0].adapter.info else None,
        bits_per_weight_with_adapters=8 * (q_bytes + adapter_bytes) / n_weights if n_weights else None,
        adapters=[AdapterRecord(name=a.adapter.name, method=a.adapter.method, rank=a.adapter.rank,
                                rel_error_before=a.rel_error_before, rel_error_after=a.rel_error_after,
                                info=a.adapter.info) for a in result.adapters],
        kv_cache=run["kv_cache"], checkpoint_bytes=stats["checkpoint_bytes"], gguf_bytes=stats.get("gguf_bytes"),
        **run["accounting"], expert_tokens=result.expert_tokens, dense_bytes=stats["dense_bytes"],
        quantized_weights=n_weights, evaluation=evals, evaluation_protocol=PROTOCOL,
        modules=[ModuleRecord(name=m.record.name, method=m.record.method, bits=m.record.bits, layout=m.record.layout,
                              group_size=getattr(m.record, "group_size", None),
                              symmetric=getattr(m.record, "symmetric", None), rel_error=m.rel_error,
                              bits_per_weight=stats["modules"][m.record.name]["bits_per_weight"],
                              bytes=stats["modules"][m.record.name]["bytes"], seconds=round(m.seconds, 4),
                              tokens=m.tokens, excluded_tokens=m.excluded_tokens, info=m.record.info)
                 for m in result.modules]
        + [ModuleRecord(name=m.record.name, method=m.record.method, bits=16, layout="dense", group_size=-1,
                        symmetric=False, rel_error=m.rel_error, bits_per_weight=16.0, bytes=0,
                        seconds=round(m.seconds, 4), tokens=m.tokens, excluded_tokens=m.excluded_tokens,
                        info=m.record.info)
           for m in result.replaced])
    report.expect = check_expect(recipe, report)
    return report


def check_expect(recipe: Recipe, report: Report) -> dict | None:
    exp = recipe.expect
    if exp is None:
        return None
    out = {}
    if exp.max_bits_per_weight is not None:
        out["max_bits_per_weight"] = {"bound": exp.max_bits_per_weight, "value": report.bits_per_weight,
                                      "ok": report.bits_per_weight <= exp.max_bits_per_weight}
    if exp.max_ppl_ratio is not None and report.evaluation:
        worst = max(e.ppl / e.baseline_ppl for e in report.evaluation)
        out["max_ppl_ratio"] = {"bound": exp.max_ppl_ratio, "value": worst, "ok": worst <= exp.max_ppl_ratio}
    return out
