"""The Python API the CLI mirrors: compress, evaluate, load, inspect."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from pydantic import ValidationError

from calq.calibration import offload as offload_lib
from calq.calibration.blocks import capture_block_inputs, find_blocks, find_linears, move_outside_blocks
from calq.calibration.data import calibration_windows, evaluation_windows, load_text
from calq.calibration.distributed import SOLO, PeerFailed, Solo, join, launched_rank
from calq.calibration.engine import EngineResult, ModuleResult, PrepareContext, run_blocks, stage_targets
from calq.calibration.experts import CheckpointNames
from calq.calibration.loading import is_calq_checkpoint, load_model, source_info
from calq.calibration.moe import MoESettings, expert_shapes
from calq.calibration.offload import choose_offload
from calq.calibration.source import ModelSource, compute_dtype, load_disk, streamed_ppl
from calq.errors import CalqError, ExpectationFailed, ModelError, RecipeError
from calq.eval import memory
from calq.eval.accounting import accounting
from calq.eval.assemble import build_report, evaluation_results
from calq.eval.kv_apply import checkpoint_cache, kv_cache_applied, write_cache_stage
from calq.eval.perplexity import kl_to_reference, perplexity
from calq.eval.report import Report, peak_rss_bytes, write_report
from calq.export.peft import ADAPTER_DIR, write_adapter
from calq.methods import METHODS
from calq.methods.registry import Method, order_problem
from calq.methods.xquant import KVCacheSpec
from calq.recipe.load import dump_recipe, load_recipe, merge_overrides
from calq.recipe.schema import Evaluation, Recipe, validate_recipe
from calq.zoo import resolve_model

Progress = Callable[[dict], None]


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


def moe_settings(model, recipe: Recipe) -> MoESettings:
    """The engine's MoE settings: fused experts to route (none for most models), the rare-expert rule."""
    m = recipe.moe
    return MoESettings(CheckpointNames(model), m.calibrate_all_experts, m.min_tokens, m.dampening_frac,
                       m.experts_per_pass)


def compress_model(model, tokenizer, recipe: Recipe, device, store_dtype: torch.dtype = torch.float16,
                   progress: Progress | None = None, rest_dtype: torch.dtype | None = None,
                   onload=None, offload=None, store=None, group: Solo = SOLO):
    """Calibrate and compress `model` in place (blocks end on CPU in rest_dtype, default their own dtype).

    onload/offload: the engine's hooks (disk offload); store: a resume.BlockStore for the block loop.
    group: the ranks of a distributed run (calibration/distributed.py `join`); each calibrates on its share of the
    batches, and every rank ends with the same compressed model.
    Returns the engine's per-module results.
    """
    cal = recipe.calibration
    torch.manual_seed(cal.seed)
    stages = [METHODS[s.method](s) for s in recipe.stages]
    data_free = all(m.data_free for m in stages)        # RTN, magnitude pruning: no calibration forward at all
    ids = torch.empty(0, cal.seq_len, dtype=torch.long) if data_free else \
        calibration_windows(load_text(cal.dataset, "calibration"), tokenizer, cal.num_samples, cal.seq_len, cal.seed)
    batches = [] if data_free else group.share(list(ids.split(cal.batch_size)))
    dtype = compute_dtype(device, store_dtype)

    def stage_batches(stage) -> list[torch.Tensor]:
        c = stage.config.calibration
        n, t, seed = c.num_samples or cal.num_samples, c.seq_len or cal.seq_len, cal.seed if c.seed is None else c.seed
        return group.share(list(calibration_windows(load_text(c.dataset, "calibration"), tokenizer, n, t, seed)
                                .split(cal.batch_size)))

    def run(model, stages, onload=None, offload=None, store=None):
        prefix, blocks = find_blocks(model)
        move_outside_blocks(model, blocks, device, dtype)   # blocks stay on CPU, visit the device one at a time
        inputs = capture_block_inputs(model, blocks[0], batches, device) if batches else []
        own = {k: capture_block_inputs(model, blocks[0], stage_batches(st), device)
               for k, st in enumerate(stages) if st.config.calibration is not None}
        if progress:
            progress({"event": "start", "blocks": len(blocks), "methods": [s.name for s in stages]})
        result = run_blocks(blocks, prefix, inputs, stages, device, store_dtype, progress, cal.propagate, dtype,
                            rest_dtype, onload, offload, own, cal.massive_token_ratio, moe_settings(model, recipe),
                            store, group)
        move_outside_blocks(model, blocks, "cpu", None)  # the blocks are on CPU already (or on meta, offloaded)
        return result

    for method in stages:
        method.prepare(model, PrepareContext(ids, device, cal.seed, run, progress))
    if any(type(m).prepare is not Method.prepare for m in stages):
        group.sync_module(model)        # prepare ran on every rank (a LoRA trained on a GPU need not agree)
    result = run(model, stages, onload, offload, store)
    for method in stages:       # modules outside the blocks that a method compressed in prepare (already installed)
        result.modules.extend(ModuleResult(rec, None, 0.0, 0) for rec in method.model_records())
    return result


def _resolve_recipe(recipe: Recipe | str | Path, overrides: dict, evaluate: bool) -> Recipe:
    if isinstance(recipe, Recipe):
        recipe = validate_recipe(merge_overrides(recipe.model_dump(mode="json"), overrides))
    else:
        recipe = load_recipe(recipe, overrides)
    if not evaluate and recipe.expect is not None and recipe.expect.max_ppl_ratio is not None:
        # a CI gate must not pass by skipping its check
        raise RecipeError("expect.max_ppl_ratio needs the evaluation that --no-eval skips",
                          "drop --no-eval, or remove max_ppl_ratio from the recipe's expect:")
    return recipe


def _offload_mode(offload: str, model_path: Path, recipe: Recipe, has_cache_stage: bool) -> str:
    """Where the weights rest: "disk" when asked (or, for "auto", when they exceed half the RAM) and possible."""
    mode = choose_offload(offload, model_path)
    if mode == "disk" and is_calq_checkpoint(model_path):
        if offload == "disk":
            raise ModelError(f"{recipe.model} is a calq checkpoint; disk offload reads dense models",
                             "use --offload cpu")
        mode = "cpu"
    if has_cache_stage and mode == "disk":
        if offload == "disk":
            raise CalqError("a KV-cache stage (xquant) needs the model in RAM", "use --offload cpu")
        mode = "cpu"
    return mode


class _Phases:
    """Seconds and peak RSS per phase of a run, as the report records them."""

    def __init__(self, emit: Progress):
        self.emit, self.timings, self.peaks = emit, {}, {}

    @contextmanager
    def __call__(self, timing: str, peak: str | None = None, shown: str | None = None):
        if shown:
            self.emit({"event": "phase", "name": shown})
        t = time.time()
        yield
        self.timings[timing] = time.time() - t
        self.peaks[peak or timing] = peak_rss_bytes()


def compress(recipe: Recipe | str | Path, output: str | Path, *, model: str | None = None,
             device: str = "auto", seed: int | None = None, num_samples: int | None = None,
             seq_len: int | None = None, evaluate: bool = True, overwrite: bool = False,
             progress: Progress | None = None, offload: str = "auto", allow_pickle: bool = False,
             resume: bool = False) -> Report | None:
    """Run a recipe: calibrate, compress block by block, write the checkpoint and report to `output`.

    offload: where weights rest. "cpu" holds the model in RAM; "disk" reads one block at a time from the
    model's safetensors files and writes each compressed block as its own shard (RAM holds one block);
    "auto" picks disk when the weights exceed half of the available RAM. The checkpoint is the same.
    allow_pickle: read a model folder that has only `pytorch_model.bin` (transformers' weights_only loader).
    resume: save each finished block in `.OUTPUT.partial` and, if an interrupted run of the same recipe and model
    left one there, continue after its last finished block (the checkpoint is the same, byte for byte).
    Started by torchrun (WORLD_SIZE > 1), each process calibrates on its share of the batches; rank 0 writes and
    evaluates, and returns the report; the other ranks return None once it is done.
    """
    t0 = time.time()
    recipe = _resolve_recipe(recipe, {"model": model, "calibration": {"seed": seed, "num_samples": num_samples,
                                                                      "seq_len": seq_len}}, evaluate)
    group, dev = join(resolve_device(device))
    try:
        report = _compress(recipe, Path(output), dev, group, t0, evaluate=evaluate, overwrite=overwrite,
                           emit=progress or (lambda e: None), offload=offload, allow_pickle=allow_pickle,
                           resume=resume)
    except PeerFailed:
        raise
    except Exception as e:
        group.fail(e)
        raise
    group.check()           # the other ranks wait here until rank 0 has written and scored the checkpoint
    failed = [k for k, v in (report.expect or {}).items() if not v["ok"]] if report else []
    if failed:
        detail = "; ".join(f"{k} = {report.expect[k]['value']:.4f} > {report.expect[k]['bound']}" for k in failed)
        raise ExpectationFailed(f"expect: {detail} (checkpoint written to {output})",
                                "the recipe no longer meets its expect: block")
    return report


def process_rank() -> int:
    """The rank torchrun gave this process (0 outside torchrun): the CLI draws progress and errors on rank 0 only."""
    return launched_rank()


def _compress(recipe: Recipe, output: Path, dev, group: Solo, t0: float, *, evaluate: bool, overwrite: bool,
              emit: Progress, offload: str, allow_pickle: bool, resume: bool) -> Report | None:
    """compress's phases; on a rank other than 0 only loading and the block loop, and None."""
    from calq.export.staging import check_output, staged

    lead = group.rank == 0
    model_path = Path(resolve_model(recipe.model, _notify(emit)))
    if lead:
        check_output(output, overwrite)
    if model_path.exists() and output.resolve() == model_path.resolve():
        raise CalqError(f"--output {output} is the model folder the recipe reads", "write to another folder")
    cache_stages = [s for s in recipe.stages if METHODS[s.method].scope == "cache"]
    mode = _offload_mode(offload, model_path, recipe, bool(cache_stages))
    weights_recipe = recipe.model_copy(update={"stages": [s for s in recipe.stages if s not in cache_stages]})
    phase = _Phases(emit)
    folder = staged(output, overwrite, resumable=resume) if lead else nullcontext()
    with _kept_on_interrupt(output, resume), folder as tmp:
        with phase("load"):
            src = ModelSource(recipe.model, mode, allow_pickle)
            predicted = _check_model(src, recipe, weights_recipe, dev, evaluate, group.size)
        windows: dict = {}
        baseline = {}
        if evaluate and lead:
            with phase("baseline_evaluation", "dense_evaluation", "dense evaluation"), src.dense_scorer(dev) as score:
                baseline = _eval_all(score, src.tokenizer, recipe, windows, f"the dense model {recipe.model}")
        store = _block_store(tmp, recipe, model_path, mode, dev, group.size) if resume and lead else None
        if resume and group.size > 1:
            from calq.calibration.resume import SharedStore

            store = SharedStore(store, group)
        with phase("compress"):
            result = compress_model(src.model, src.tokenizer, weights_recipe, dev, src.store_dtype, emit,
                                    store=store, group=group, **src.engine_hooks(tmp)) \
                if weights_recipe.stages else EngineResult()
        if not lead:
            return None
        if resume:
            from calq.calibration.resume import DIR

            shutil.rmtree(tmp / DIR)         # every block is done; the rest is quick to redo
        with phase("write"):
            stats, extra = _write_all(src, recipe, result, cache_stages, tmp, emit)
        src.release()
        evals = []
        if evaluate:
            with phase("evaluation", shown="evaluation of the checkpoint read back from disk"), \
                    src.reloaded_scorer(tmp, dev, checkpoint_cache) as score:
                after = _eval_all(score, src.tokenizer, recipe, windows, "the compressed checkpoint")
            evals = evaluation_results(recipe, after, baseline)
        timings = {**phase.timings, "per_block": [round(x, 3) for x in result.block_seconds],
                   "phases": {k: round(v, 3) for k, v in result.phase_seconds.items()}, "total": time.time() - t0}
        report = build_report(recipe, {"source": src.info, "device": dev, "offload": mode, "timings": timings,
                                       "peaks": phase.peaks, "predicted": predicted, **extra,
                                       "resumed_blocks": store.done if store else 0}, result, stats, evals)
        write_report(report, tmp)
    return report


@contextmanager
def _kept_on_interrupt(output: Path, resume: bool):
    """Ctrl-C or SIGTERM in a resumable run: the interrupt carries the folder it keeps, for the CLI's message."""
    try:
        yield
    except KeyboardInterrupt as e:
        from calq.export.staging import partial_folder

        if resume and partial_folder(output).is_dir():
            e.kept = str(partial_folder(output))
        raise


def _block_store(tmp: Path, recipe: Recipe, model_path: Path, mode: str, dev, ranks: int = 1):
    """The resume store in tmp; what must match to continue a run: recipe, model files, versions, threads (and
    the number of ranks, as the order of fp64 sums between them could change a last bit)."""
    from calq import __version__
    from calq.calibration.resume import DIR, BlockStore, fingerprint, recipe_hash

    manifest = {"recipe": recipe_hash(dump_recipe(recipe)), "model": fingerprint(model_path), "calq": __version__,
                "torch": torch.__version__, "offload": mode, "device": str(dev),
                "threads": torch.get_num_threads()}      # fp32 GEMM sums in a thread-dependent order
    if ranks > 1:
        manifest["world_size"] = ranks
    return BlockStore(tmp / DIR, manifest)


def _check_model(src: ModelSource, recipe: Recipe, weights_recipe: Recipe, dev, evaluate: bool,
                 ranks: int = 1) -> dict:
    """Checks that need the loaded model, before any work; the memory plan (refused when it cannot fit)."""
    _check_stages(weights_recipe, src.model)
    if not all(METHODS[st.method](st).data_free for st in weights_recipe.stages):
        _check_positions(src.model, recipe.calibration.seq_len, "calibration.seq_len")
    if evaluate:
        _check_positions(src.model, recipe.evaluation.seq_len, "evaluation.seq_len")
    predicted = memory.plan(weights_recipe, src.model, compute_dtype(dev, src.store_dtype), evaluate, ranks)
    memory.check(predicted, offload_lib.available_ram())
    return predicted


def _write_all(src: ModelSource, recipe: Recipe, result, cache_stages: list, out: Path, emit: Progress):
    """Checkpoint, KV-cache factors, adapter, tokenizer, recipe and (if asked) GGUF into out.
    Returns (writer stats, the report's accounting / kv_cache / adapter_bytes)."""
    ignore = sorted({i for s in recipe.stages for i in s.ignore if not i.startswith("re:")})
    stats = src.write([m.record for m in result.modules], out, ignore)
    model = src.model
    ckpt = CheckpointNames(model)
    for m in result.modules:        # where `calq inspect` finds it, when the hub's name differs (Mixtral)
        if ckpt.hub_name(m.record.name) != m.record.name:
            m.record.info["checkpoint_name"] = ckpt.hub_name(m.record.name)
    acct = accounting(stats["sizes"], find_blocks(model)[0], {f"{m.record.name}.weight" for m in result.replaced})
    kv_record = None
    if cache_stages:    # from the weights as written: the factors are those of the final k/v_proj
        emit({"event": "phase", "name": "KV-cache factors"})
        kv_record = write_cache_stage(model, cache_stages[0].spec(), out)
        stats["checkpoint_bytes"] += kv_record.pop("file_bytes")
    adapter_bytes = write_adapter([a.adapter for a in result.adapters], out / ADAPTER_DIR, recipe.model,
                                  src.store_dtype) if result.adapters else 0
    src.tokenizer.save_pretrained(out)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    if recipe.output.format == "gguf":
        from calq.export.gguf import export_gguf

        emit({"event": "phase", "name": "writing model.gguf"})
        stats["gguf_bytes"] = export_gguf(out, out / "model.gguf", embeddings=recipe.output.embeddings)["bytes"]
    return stats, {"accounting": acct, "kv_cache": kv_record, "adapter_bytes": adapter_bytes}


def _notify(emit: Progress) -> Callable[[str], None]:
    return lambda msg: emit({"event": "phase", "name": msg})


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
        model, disk, tokenizer = load_disk(target, torch.float32)
        score = streamed_ppl(disk, dev, torch.float32)
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
