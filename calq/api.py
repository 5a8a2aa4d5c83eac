"""The Python API the CLI mirrors: compress, evaluate, load, inspect."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import ValidationError

from calq.calibration import offload as offload_lib
from calq.calibration.blocks import capture_block_inputs, find_blocks, find_linears, move_outside_blocks
from calq.calibration.data import calibration_windows, evaluation_windows, load_text
from calq.calibration.engine import EngineResult, ModuleResult, PrepareContext, run_blocks, stage_targets
from calq.calibration.experts import CheckpointNames
from calq.calibration.loading import (
    check_causal_lm,
    is_calq_checkpoint,
    load_model,
    load_tokenizer,
    quiet_transformers,
    source_info,
)
from calq.calibration.moe import MoESettings, expert_shapes
from calq.calibration.offload import DiskBlocks, choose_offload, empty_model, streamed_window_losses
from calq.errors import CalqError, ExpectationFailed, ModelError, RecipeError
from calq.eval import memory
from calq.eval.accounting import accounting
from calq.eval.perplexity import kl_to_reference, perplexity
from calq.eval.report import (
    AdapterRecord,
    EvalResult,
    ModuleRecord,
    Report,
    peak_rss_bytes,
    versions,
    write_report,
)
from calq.export.peft import ADAPTER_DIR, write_adapter
from calq.methods import METHODS
from calq.methods.base import Packed
from calq.methods.registry import order_problem
from calq.methods.xquant import KVCacheSpec
from calq.recipe.load import dump_recipe, load_recipe, merge_overrides
from calq.recipe.schema import Evaluation, Recipe, validate_recipe
from calq.zoo import resolve_model

Progress = Callable[[dict], None]
PROTOCOL = ("GPTQ protocol: text joined once, tokenized once, non-overlapping windows (tail dropped), "
            "fp32 loss, ppl = exp(mean window loss)")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CalqError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    backends = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}
    if dev.type == "cpu":
        return dev
    if dev.type not in backends:          # meta holds no data; the rest have no calq support
        raise CalqError(f"device {device!r} cannot run calq", "use auto, cpu, cuda or cuda:N")
    backend = backends[dev.type]
    if backend is None or not backend.is_available():
        raise CalqError(f"device {device} requested but {dev.type.upper()} is not available", "use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise CalqError(f"device {device} requested but this machine has {count} {dev.type} device(s)",
                        f"use {dev.type}:0 to {dev.type}:{count - 1}")
    return dev


def _check_stages(recipe: Recipe, model) -> None:
    """Checks that need the model: each stage matches something, group sizes divide, and the stages acting on
    each Linear come in an order the checkpoint can hold."""
    prefix, blocks = find_blocks(model)
    linears = {}
    names = CheckpointNames(model)
    for i, block in enumerate(blocks):
        linears.update(find_linears(block, f"{prefix}.{i}"))
        linears.update(expert_shapes(block, f"{prefix}.{i}", names))
    acting: dict[str, list[int]] = {}       # Linear -> the stages that act on it, in order
    methods = [METHODS[stage.method](stage) for stage in recipe.stages]
    for i, (stage, method) in enumerate(zip(recipe.stages, methods, strict=True)):
        targets = stage_targets(linears, stage)
        if not targets:
            raise RecipeError(f"stages[{i}].targets: no module inside {prefix} matches {stage.targets} "
                              f"(ignore {stage.ignore})", "check targets and ignore")
        for name, mod in targets.items():
            acting.setdefault(name, []).append(i)
            problem = method.check_shape(tuple(mod.weight.shape))
            if problem:
                key, msg = problem
                raise RecipeError(f"stages[{i}].{key}: {msg} of {name}",
                                  "pick a value that divides it (group_size -1 means one group per channel)")
    for name, idx in acting.items():
        problem = order_problem([methods[i] for i in idx])
        if problem:
            k, msg, fix = problem
            raise RecipeError(f"stages[{idx[k]}]: {msg} (on {name})", fix)




def _eval_all(score: Callable[[torch.Tensor, int], float], tokenizer, recipe: Recipe,
              windows_cache: dict, what: str) -> dict[str, tuple[int, float]]:
    """score(windows, batch_size) -> perplexity, on each evaluation dataset; `what` is scored (for errors)."""
    ev = recipe.evaluation
    out = {}
    for spec in ev.datasets:
        if spec not in windows_cache:
            windows_cache[spec] = evaluation_windows(load_text(spec, "evaluation"), tokenizer, ev.seq_len,
                                                     ev.max_windows)
        w = windows_cache[spec]
        out[spec] = (w.shape[0], _finite(score(w, ev.batch_size), what, spec))
    return out


def _finite(ppl: float, what: str, spec: str) -> float:
    """A perplexity that JSON and ratios can hold; inf or NaN means the model's outputs overflowed."""
    if not math.isfinite(ppl):
        raise ModelError(f"{what} scores a non-finite perplexity ({ppl}) on {spec}: its logits overflow",
                         "score it in fp32 (--device cpu); if that fails too, the model itself is broken")
    return ppl


def _load_disk(ref: str, dtype: torch.dtype | None = None, with_tokenizer: bool = True):
    """(meta-device model with all but its blocks read, its DiskBlocks, tokenizer or None) for disk offload.

    dtype None keeps the checkpoint's own, as load_model(dtype=None) does."""
    from calq.export.reader import CheckpointReader, dense_config, tied_output_key

    quiet_transformers()
    path = Path(resolve_model(ref))
    config, _ = dense_config(path)
    check_causal_lm(config.to_dict(), ref)
    reader = CheckpointReader(path)
    dtype = dtype or getattr(config, "dtype", None) or reader.first_dtype()
    model = empty_model(config, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    names, tied = reader.names(model), tied_output_key(model)      # the hub's names: fused experts per expert
    keys = set(names.to_checkpoint(names.unfuse({k: v for k, v in model.state_dict().items() if k != tied})))
    if keys != set(reader.files) and reader.qconfig is None:    # a calq checkpoint stores packed names
        missing, extra = sorted(keys - set(reader.files)), sorted(set(reader.files) - keys)
        if not extra:
            raise ModelError(f"{ref} lacks {len(missing)} weights the architecture needs, e.g. "
                             f"{', '.join(missing[:3])}", "the model files are incomplete; download the model again")
        raise ModelError(f"disk offload needs the checkpoint's tensor names to be the model's; {ref} differs "
                         f"({', '.join((missing + extra)[:3])})",
                         "use --offload cpu (transformers renames them while loading)")
    disk = DiskBlocks(model, reader.read_into)
    disk.load_rest()
    tokenizer = load_tokenizer(path, ref) if with_tokenizer else None
    return model, disk, tokenizer


def _streamed_ppl(disk: DiskBlocks, device, dtype: torch.dtype) -> Callable[[torch.Tensor, int], float]:
    def score(windows: torch.Tensor, batch_size: int) -> float:
        losses = streamed_window_losses(disk, list(windows.split(batch_size)), device, dtype)
        return math.exp(torch.cat(losses).mean().item())
    return score


def _in_ram_ppl(model, device) -> Callable[[torch.Tensor, int], float]:
    return lambda windows, batch_size: perplexity(model, windows, batch_size=batch_size, device=device)


def compute_dtype(device: torch.device, store_dtype: torch.dtype) -> torch.dtype:
    # CPUs have no fast fp16 matmul and bf16 loses too much for Hessians' inputs: fp32. Accelerators: as stored.
    return torch.float32 if device.type == "cpu" else store_dtype


def moe_settings(model, recipe: Recipe) -> MoESettings:
    """The engine's MoE settings: fused experts to route (none for most models), the rare-expert rule."""
    m = recipe.moe
    return MoESettings(CheckpointNames(model), m.calibrate_all_experts, m.min_tokens, m.dampening_frac,
                       m.experts_per_pass)


def compress_model(model, tokenizer, recipe: Recipe, device, store_dtype: torch.dtype = torch.float16,
                   progress: Progress | None = None, rest_dtype: torch.dtype | None = None,
                   onload=None, offload=None):
    """Calibrate and compress `model` in place (blocks end on CPU in rest_dtype, default their own dtype).

    onload/offload: the engine's hooks (disk offload). Returns the engine's per-module results.
    """
    cal = recipe.calibration
    torch.manual_seed(cal.seed)
    stages = [METHODS[s.method](s) for s in recipe.stages]
    data_free = all(m.data_free for m in stages)        # RTN, magnitude pruning: no calibration forward at all
    ids = torch.empty(0, cal.seq_len, dtype=torch.long) if data_free else \
        calibration_windows(load_text(cal.dataset, "calibration"), tokenizer, cal.num_samples, cal.seq_len, cal.seed)
    batches = [] if data_free else list(ids.split(cal.batch_size))
    dtype = compute_dtype(device, store_dtype)

    def stage_batches(stage) -> list[torch.Tensor]:
        c = stage.config.calibration
        n, t, seed = c.num_samples or cal.num_samples, c.seq_len or cal.seq_len, cal.seed if c.seed is None else c.seed
        return list(calibration_windows(load_text(c.dataset, "calibration"), tokenizer, n, t, seed)
                    .split(cal.batch_size))

    def run(model, stages, onload=None, offload=None):
        prefix, blocks = find_blocks(model)
        move_outside_blocks(model, blocks, device, dtype)   # blocks stay on CPU, visit the device one at a time
        inputs = capture_block_inputs(model, blocks[0], batches, device) if batches else []
        own = {k: capture_block_inputs(model, blocks[0], stage_batches(st), device)
               for k, st in enumerate(stages) if st.config.calibration is not None}
        if progress:
            progress({"event": "start", "blocks": len(blocks), "methods": [s.name for s in stages]})
        result = run_blocks(blocks, prefix, inputs, stages, device, store_dtype, progress, cal.propagate, dtype,
                            rest_dtype, onload, offload, own, cal.massive_token_ratio, moe_settings(model, recipe))
        move_outside_blocks(model, blocks, "cpu", None)  # the blocks are on CPU already (or on meta, offloaded)
        return result

    for method in stages:
        method.prepare(model, PrepareContext(ids, device, cal.seed, run, progress))
    result = run(model, stages, onload, offload)
    for method in stages:       # modules outside the blocks that a method compressed in prepare (already installed)
        result.modules.extend(ModuleResult(rec, None, 0.0, 0) for rec in method.model_records())
    return result


def compress(recipe: Recipe | str | Path, output: str | Path, *, model: str | None = None,
             device: str = "auto", seed: int | None = None, num_samples: int | None = None,
             seq_len: int | None = None, evaluate: bool = True, overwrite: bool = False,
             progress: Progress | None = None, offload: str = "auto", allow_pickle: bool = False) -> Report:
    """Run a recipe: calibrate, compress block by block, write the checkpoint and report to `output`.

    offload: where weights rest. "cpu" holds the model in RAM; "disk" reads one block at a time from the
    model's safetensors files and writes each compressed block as its own shard (RAM holds one block);
    "auto" picks disk when the weights exceed half of the available RAM. The checkpoint is the same.
    allow_pickle: read a model folder that has only `pytorch_model.bin` (transformers' weights_only loader).
    """
    from calq.export.reader import load_checkpoint
    from calq.export.staging import check_output, staged
    from calq.export.writer import ShardedWriter, write_checkpoint

    t0 = time.time()
    overrides = {"model": model, "calibration": {"seed": seed, "num_samples": num_samples, "seq_len": seq_len}}
    if isinstance(recipe, Recipe):
        recipe = validate_recipe(merge_overrides(recipe.model_dump(mode="json"), overrides))
    else:
        recipe = load_recipe(recipe, overrides)
    if not evaluate and recipe.expect is not None and recipe.expect.max_ppl_ratio is not None:
        # a CI gate must not pass by skipping its check
        raise RecipeError("expect.max_ppl_ratio needs the evaluation that --no-eval skips",
                          "drop --no-eval, or remove max_ppl_ratio from the recipe's expect:")
    output = Path(output)
    dev = resolve_device(device)
    emit = progress or (lambda e: None)
    model_path = Path(resolve_model(recipe.model, _notify(emit)))
    check_output(output, overwrite)
    if model_path.exists() and output.resolve() == model_path.resolve():
        raise CalqError(f"--output {output} is the model folder the recipe reads", "write to another folder")
    mode = choose_offload(offload, model_path)
    if mode == "disk" and is_calq_checkpoint(model_path):
        if offload == "disk":
            raise ModelError(f"{recipe.model} is a calq checkpoint; disk offload reads dense models",
                             "use --offload cpu")
        mode = "cpu"
    cache_stages = [s for s in recipe.stages if METHODS[s.method].scope == "cache"]
    if cache_stages and mode == "disk":
        if offload == "disk":
            raise CalqError("a KV-cache stage (xquant) needs the model in RAM", "use --offload cpu")
        mode = "cpu"
    weights_recipe = recipe.model_copy(update={"stages": [s for s in recipe.stages if s not in cache_stages]})
    with staged(output, overwrite) as tmp:
        timings: dict = {}
        t = time.time()
        if mode == "disk":
            model_, disk, tokenizer = _load_disk(recipe.model)
        else:
            model_, tokenizer, _ = load_model(recipe.model, dtype=None, allow_pickle=allow_pickle)
        store_dtype = next(p for p in model_.parameters() if not p.is_meta).dtype
        source = source_info(recipe.model)
        _check_stages(weights_recipe, model_)
        if not all(METHODS[st.method](st).data_free for st in weights_recipe.stages):
            _check_positions(model_, recipe.calibration.seq_len, "calibration.seq_len")
        if evaluate:
            _check_positions(model_, recipe.evaluation.seq_len, "evaluation.seq_len")
        predicted = memory.plan(weights_recipe, model_, compute_dtype(dev, store_dtype), evaluate)
        memory.check(predicted, offload_lib.available_ram())
        timings["load"] = time.time() - t
        peaks = {"load": peak_rss_bytes()}

        windows_cache: dict = {}
        baseline = {}
        if evaluate:
            t = time.time()
            emit({"event": "phase", "name": "dense evaluation"})
            if mode == "disk":
                baseline = _eval_all(_streamed_ppl(disk, dev, compute_dtype(dev, store_dtype)), tokenizer, recipe,
                                     windows_cache, f"the dense model {recipe.model}")
            else:
                baseline = _eval_all(_in_ram_ppl(model_.to(dev, compute_dtype(dev, store_dtype)), dev), tokenizer,
                                     recipe, windows_cache, f"the dense model {recipe.model}")
                model_.to("cpu", store_dtype)
            timings["baseline_evaluation"] = time.time() - t
            peaks["dense_evaluation"] = peak_rss_bytes()

        t = time.time()
        hooks = {}
        if mode == "disk":
            writer = ShardedWriter(tmp, len(disk.blocks) + 1, store_dtype, CheckpointNames(model_))
            hooks = {"onload": disk.onload, "offload": _write_block(disk, writer)}
        result = compress_model(model_, tokenizer, weights_recipe, dev, store_dtype, emit, **hooks) \
            if weights_recipe.stages else EngineResult()
        timings["compress"] = time.time() - t
        peaks["compress"] = peak_rss_bytes()
        timings["per_block"] = [round(x, 3) for x in result.block_seconds]
        timings["phases"] = {k: round(v, 3) for k, v in result.phase_seconds.items()}

        t = time.time()
        records = [m.record for m in result.modules]
        ignore = sorted({i for s in recipe.stages for i in s.ignore if not i.startswith("re:")})
        if mode == "disk":
            stats = writer.finish(model_.to(store_dtype), records, ignore)
        else:
            stats = write_checkpoint(model_.to(store_dtype), records, tmp, ignore)
        stats["dense_sizes"] = {n: m.weight.numel() for n, m in model_.named_modules()
                                if isinstance(m, torch.nn.Linear)}
        ckpt = CheckpointNames(model_)
        stats["dense_sizes"].update({n: oc * ic for n, (oc, ic) in ckpt.expert_shapes().items()})
        for m in result.modules:        # where `calq inspect` finds it, when the hub's name differs (Mixtral)
            if ckpt.hub_name(m.record.name) != m.record.name:
                m.record.info["checkpoint_name"] = ckpt.hub_name(m.record.name)
        acct = accounting(stats["sizes"], find_blocks(model_)[0], {f"{m.record.name}.weight" for m in result.replaced})
        kv_record = None
        if cache_stages:    # from the weights as written: the factors are those of the final k/v_proj
            emit({"event": "phase", "name": "KV-cache factors"})
            kv_record = _write_cache_stage(model_, cache_stages[0].spec(), tmp)
            stats["checkpoint_bytes"] += kv_record.pop("file_bytes")
        adapter_bytes = 0
        if result.adapters:
            adapter_bytes = write_adapter([a.adapter for a in result.adapters], tmp / ADAPTER_DIR, recipe.model,
                                          store_dtype)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        if recipe.output.format == "gguf":
            from calq.export.gguf import export_gguf

            emit({"event": "phase", "name": "writing model.gguf"})
            stats["gguf_bytes"] = export_gguf(tmp, tmp / "model.gguf", embeddings=recipe.output.embeddings)["bytes"]
        timings["write"] = time.time() - t
        peaks["write"] = peak_rss_bytes()
        del model_

        evals = []
        if evaluate:
            t = time.time()
            emit({"event": "phase", "name": "evaluation of the checkpoint read back from disk"})
            if mode == "disk":
                # fp32 as load_checkpoint reads it; streamed block by block like the dense baseline
                _, disk, _ = _load_disk(str(tmp), torch.float32, with_tokenizer=False)
                after = _eval_all(_streamed_ppl(disk, dev, torch.float32), tokenizer, recipe, windows_cache,
                                  "the compressed checkpoint")
                del disk
            else:
                reloaded = load_checkpoint(tmp, dtype=torch.float32).to(dev)
                with _checkpoint_cache(reloaded, tmp):
                    after = _eval_all(_in_ram_ppl(reloaded, dev), tokenizer, recipe, windows_cache,
                                      "the compressed checkpoint")
                del reloaded
            evals = [EvalResult(dataset=s, seq_len=recipe.evaluation.seq_len, windows=n, ppl=p,
                                baseline_ppl=baseline[s][1]) for s, (n, p) in after.items()]
            timings["evaluation"] = time.time() - t
            peaks["evaluation"] = peak_rss_bytes()

        # Over every Linear a stage replaced: packed bytes where quantized, fp16 where only pruned.
        quantized = {m.record.name for m in result.modules}
        dense_only = [m for m in result.replaced if m.record.name not in quantized]
        n_weights = sum(_n_weights(m.record) for m in result.modules) + \
            sum(stats["dense_sizes"][m.record.name] for m in dense_only)
        q_bytes = sum(stats["modules"][m.record.name]["bytes"] for m in result.modules) + \
            sum(2 * stats["dense_sizes"][m.record.name] for m in dense_only)
        timings["total"] = time.time() - t0
        report = Report(
            **versions(), model=recipe.model, source=source, recipe=recipe.model_dump(mode="json"),
            seed=recipe.calibration.seed,
            device=str(dev), offload=mode, data_free=all(METHODS[s.method](s).data_free for s in recipe.stages),
            timings={k: (round(v, 3) if isinstance(v, float) else v) for k, v in timings.items()},
            peak_rss_bytes=peak_rss_bytes(), memory={"predicted": predicted, "peak_rss_after": peaks},
            peak_cuda_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
            skipped_modules=result.skipped, bits_per_weight=8 * q_bytes / n_weights if n_weights else 16.0,
            adapter_bytes=adapter_bytes,
            adapter_packed_bytes=sum(a.adapter.info["packed_bytes"] for a in result.adapters)
            if result.adapters and "packed_bytes" in result.adapters[0].adapter.info else None,
            bits_per_weight_with_adapters=8 * (q_bytes + adapter_bytes) / n_weights if n_weights else None,
            adapters=[AdapterRecord(name=a.adapter.name, method=a.adapter.method, rank=a.adapter.rank,
                                    rel_error_before=a.rel_error_before, rel_error_after=a.rel_error_after,
                                    info=a.adapter.info) for a in result.adapters],
            kv_cache=kv_record,
            checkpoint_bytes=stats["checkpoint_bytes"], gguf_bytes=stats.get("gguf_bytes"), **acct,
            expert_tokens=result.expert_tokens,
            dense_bytes=stats["dense_bytes"], quantized_weights=n_weights, evaluation=evals,
            evaluation_protocol=PROTOCOL,
            modules=[ModuleRecord(name=m.record.name, method=m.record.method, bits=m.record.bits,
                                  layout=m.record.layout, group_size=getattr(m.record, "group_size", None),
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
        report.expect = _check_expect(recipe, report)
        write_report(report, tmp)
    failed = [k for k, v in (report.expect or {}).items() if not v["ok"]]
    if failed:
        detail = "; ".join(f"{k} = {report.expect[k]['value']:.4f} > {report.expect[k]['bound']}" for k in failed)
        raise ExpectationFailed(f"expect: {detail} (checkpoint written to {output})",
                                "the recipe no longer meets its expect: block")
    return report


def _notify(emit: Progress) -> Callable[[str], None]:
    return lambda msg: emit({"event": "phase", "name": msg})


def _write_cache_stage(model, spec: KVCacheSpec, out_dir: Path) -> dict:
    """kv_cache.json (+ kv_cache.safetensors) for a cache stage; the report's record of it."""
    from calq.eval.kv_cache import KVRuntime
    from calq.export.kv_cache import KV_JSON, KV_TENSORS, write_kv_cache

    rt = KVRuntime(model, spec)
    summary = rt.summary()
    factor_bytes = write_kv_cache(out_dir, spec, rt.codecs, summary)
    files = sum((out_dir / f).stat().st_size for f in (KV_JSON, KV_TENSORS) if (out_dir / f).is_file())
    return {**summary, "factor_bytes": factor_bytes, "file_bytes": files}


@contextmanager
def kv_cache_applied(model, spec: KVCacheSpec | None, factors: dict | None = None):
    """Within the block, `model` reads K and V from `spec`'s quantized cache (nothing changes when spec is None).
    Yields the cache's size summary (or None)."""
    if spec is None:
        yield None
        return
    from calq.eval.kv_cache import KVRuntime
    from calq.export.kv_cache import check_factors

    rt = KVRuntime(model, spec, factors)
    if factors is not None:
        check_factors(rt.codecs)
    rt.install()
    try:
        yield rt.summary()
    finally:
        rt.remove()


def _checkpoint_cache(model, path: Path):
    from calq.export.kv_cache import read_kv_cache

    stored = read_kv_cache(path)
    return kv_cache_applied(model, *(stored or (None, None)))


def _n_weights(rec) -> int:
    return rec.n_weights if isinstance(rec, Packed) else rec.codes.numel()


def _write_block(disk: DiskBlocks, writer):
    """The engine's offload hook in disk mode: write block i as its own shard, then drop its tensors."""
    def offload(i: int, block, result) -> None:
        name = f"{disk.prefix}.{i}."
        records = [m.record for m in result.modules if m.record.name.startswith(name)]
        writer.add({name + k: v for k, v in block.state_dict().items()}, records)
        for rec in records:     # shapes stay for the report and quantization_config; the data is on disk
            if isinstance(rec, Packed):
                rec.tensors = {k: v.to("meta") for k, v in rec.tensors.items()}
                continue
            rec.codes, rec.scale = rec.codes.to("meta"), rec.scale.to("meta")
            rec.zero = None if rec.zero is None else rec.zero.to("meta")
        disk.release(i, block)
    return offload


def _check_expect(recipe: Recipe, report: Report) -> dict | None:
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


def evaluate(target: str, datasets: list[str] | None = None, seq_len: int = 2048, max_windows: int | None = None,
             device: str = "auto", batch_size: int = 8, progress: Progress | None = None,
             offload: str = "auto", reference: str | None = None, allow_pickle: bool = False,
             kv_cache: str | KVCacheSpec | None = None, kv_base_layers: int = 3,
             kv_group_size: int = 128) -> list[dict]:
    """Perplexity of a dense model (dir, hub id, zoo:NAME) or a calq checkpoint read back from disk.

    offload "disk" reads one block at a time from the safetensors files (as `compress --offload disk`), so a model
    larger than RAM can be scored; "auto" picks it when the files exceed half the available RAM.
    reference: a model (typically the dense one) to report KL(reference ‖ target) per token against, alongside.
    kv_cache: `METHOD:BITS` (xquant, xquant-cl, kivi, token) or a KVCacheSpec: every token's K and V come from that
    quantized cache (kv_base_layers first layers at 4 bits, groups of kv_group_size). Without it, a checkpoint's
    own kv_cache.json applies, if it has one."""
    from calq.calibration.data import parse_dataset_spec
    from calq.export.kv_cache import read_kv_cache

    datasets = datasets or ["stdlib:test"]
    for spec in datasets:   # cheap checks before the model loads
        parse_dataset_spec(spec)
    _check_flags(Evaluation, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
    if isinstance(kv_cache, str):
        kv_cache = KVCacheSpec.parse(kv_cache, base_layers=kv_base_layers, group_size=kv_group_size)
    dev = resolve_device(device)
    emit = progress or (lambda e: None)
    path = resolve_model(target, _notify(emit))
    stored = read_kv_cache(Path(path)) if kv_cache is None and Path(path).is_dir() else None
    cache_spec, factors = (kv_cache, None) if kv_cache is not None else (stored or (None, None))
    mode = choose_offload(offload, path)
    if cache_spec is not None and mode == "disk":
        if offload == "disk":
            raise CalqError("a quantized KV cache needs the model in RAM (XQuant-CL runs layers in order per batch)",
                            "use --offload cpu")
        mode = "cpu"
    if reference is not None and mode == "disk":
        if offload == "disk":
            raise CalqError("--reference runs both models side by side, which disk offload does not do",
                            "use --offload cpu, or leave out --reference")
        mode = "cpu"
    if mode == "disk":
        model, disk, tokenizer = _load_disk(target, torch.float32)
        score = _streamed_ppl(disk, dev, torch.float32)
    else:
        model, tokenizer, _ = load_model(target, allow_pickle=allow_pickle)
        model.to(dev)
        disk = None
    ref_model = None
    if reference is not None:
        ref_model = load_model(reference, with_tokenizer=False, notify=_notify(emit), allow_pickle=allow_pickle)[0]
        ref_model.to(dev)
    source = source_info(target)
    _check_positions(model, seq_len, "--seq-len")
    with kv_cache_applied(model, cache_spec, factors) as kv_summary:
        results = []
        for spec in datasets:
            w = evaluation_windows(load_text(spec, "evaluation"), tokenizer, seq_len, max_windows)
            if disk is not None:       # block by block over all windows: progress is per dataset
                ppl = score(w, batch_size)
                if progress:
                    progress({"event": "eval", "dataset": spec, "done": w.shape[0], "total": w.shape[0]})
            else:
                cb = (lambda d, n, s=spec: progress({"event": "eval", "dataset": s, "done": d, "total": n})) \
                    if progress else None
                ppl = perplexity(model, w, batch_size=batch_size, device=dev, on_batch=cb)
            ppl = _finite(ppl, target, spec)
            row = {"target": target, "dataset": spec, "seq_len": seq_len, "windows": int(w.shape[0]), "ppl": ppl,
                   "offload": mode, "source_format": source["format"]}
            if source["format"] == "gguf":
                row.update(gguf_file_type=source["file_type"], sha256=source["sha256"])
            if kv_summary is not None:
                row.update(kv_cache=kv_summary["label"], kv_cache_ratio=kv_summary["kv_cache_ratio"],
                           kv_cache_ratio_nominal=kv_summary["kv_cache_ratio_nominal"],
                           kv_cache_bits_per_element=kv_summary["bits_per_element"])
            if ref_model is not None:
                try:
                    row["kl_to_reference"] = kl_to_reference(model, w, ref_model, batch_size, dev)
                except ValueError as e:
                    raise CalqError(f"--reference {reference}: {e}", "compare models with the same tokenizer") from e
                row["reference"] = reference
            results.append(row)
    return results


def _check_positions(model, seq_len: int, what: str) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise CalqError(f"{what} {seq_len} is longer than the model's max_position_embeddings {max_pos}",
                        f"use {what} {max_pos} or less")


def _check_flags(section, **flags) -> None:
    """Numbers given on the command line, held to the bounds of the recipe section they stand for."""
    try:
        section(**flags)
    except ValidationError as e:
        err = e.errors()[0]
        flag = str(err["loc"][0])
        raise CalqError(f"--{flag.replace('_', '-')} {flags[flag]}: {err['msg']}",
                        "see the command's --help") from None


def load(path: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """A calq checkpoint (or any dense HF folder / zoo name) as a ready transformers model on CPU."""
    return load_model(str(path), dtype, with_tokenizer=False, allow_pickle=allow_pickle)[0]


def inspect(path: str | Path) -> list[dict]:
    """Per module of a calq checkpoint: method, bits, layout, group size, bits/weight, bytes."""
    from calq.export.inspect import inspect_checkpoint

    return inspect_checkpoint(path)
