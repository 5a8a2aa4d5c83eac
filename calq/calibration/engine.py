"""The block loop shared by every method.

For each repeated block: onload it, run the calibration batches with hooks that collect what the stage's
methods asked for, apply the methods Linear by Linear, recompute the block's outputs with the compressed
weights (they are the next block's inputs), offload it. Weights rest on CPU; activations of the
calibration set rest on CPU; the compute device holds one block at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from calq.calibration.adapters import attach_adapter
from calq.calibration.blocks import block_output, find_linears, matches, to_device
from calq.calibration.distributed import SOLO, Solo
from calq.calibration.moe import MoESettings, expert_passes, few_token_hessians, list_experts, unfused
from calq.calibration.statistics import Statistics
from calq.calibration.units import UnitInputs
from calq.errors import CalqError
from calq.methods.base import Adapter, Compressed, Packed, Replaced
from calq.methods.registry import Method


@dataclass
class ModuleResult:
    record: Compressed | Replaced | Packed
    rel_error: float | None     # ||X(W - W_hat)ᵀ|| / ||X Wᵀ|| on the calibration inputs, massive tokens left out
                                # (None: not a Linear)
    seconds: float
    tokens: int
    excluded_tokens: int = 0    # massive tokens left out of its statistics


@dataclass
class AdapterResult:
    adapter: Adapter
    rel_error_before: float     # of the compressed weight against the original, on calibration inputs
    rel_error_after: float      # of compressed + B·A


@dataclass
class EngineResult:
    modules: list[ModuleResult] = field(default_factory=list)
    adapters: list[AdapterResult] = field(default_factory=list)
    replaced: list[ModuleResult] = field(default_factory=list)   # dense replacements (pruning)
    block_seconds: list[float] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)   # targets left as they were, with the reason
    expert_tokens: dict = field(default_factory=dict)   # experts module -> tokens the router sent each expert
    # seconds in: calibration forwards (hooks included), statistics inside hooks, methods, propagation
    phase_seconds: dict = field(default_factory=lambda: {"stats_forward": 0.0, "stats_accumulate": 0.0,
                                                         "methods": 0.0, "propagate": 0.0})


def stage_targets(linears: dict[str, nn.Linear], stage, routers: set[str] = frozenset()) -> dict[str, nn.Linear]:
    """The stage's Linears; MoE routers only when a target names them (a path or `re:`, not a class name)."""
    named = [t for t in stage.targets if t.startswith("re:") or "." in t]
    return {n: m for n, m in linears.items() if matches(n, m, stage.targets) and not matches(n, m, stage.ignore)
            and (n not in routers or matches(n, m, named))}


@contextmanager
def _weights(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor] | None):
    """Temporarily give the block's Linears these weights (None: leave them)."""
    if weights is None:
        yield
        return
    saved = {n: m.weight.data.clone() for n, m in linears.items()}
    try:
        for n, m in linears.items():
            m.weight.data.copy_(weights[n].to(m.weight.dtype))
        yield
    finally:
        for n, m in linears.items():
            m.weight.data.copy_(saved[n])


def _install(rec, mod: nn.Module, W, H, W0, n: int, seconds: float, result: EngineResult,
             block: nn.Module | None = None, block_prefix: str = "", excluded: int = 0,
             energy: tuple[float | None, float | None] = (None, None)) -> None:
    """Put a method's result into the model and the run's records. W: the weight the method saw; W0: the
    weight before any stage; energy: tr(W H Wᵀ) and tr(W0 H W0ᵀ) where the calibration forward measured them.
    Dense tensors are dropped from records once the model holds them."""
    if isinstance(rec, Adapter):
        base = W if rec.W_base is None else rec.W_base
        mod.weight.data.copy_(base.to(mod.weight.dtype))
        attach_adapter(mod, rec.A, rec.B)
        result.adapters.append(AdapterResult(rec, _rel_error(W0, base, H, den=energy[1]),
                                             _rel_error(W0, base + rec.B @ rec.A, H, den=energy[1])))
        rec.W_base = None
    elif isinstance(rec, Replaced):
        mod.weight.data.copy_(rec.W_new.to(mod.weight.dtype))
        result.replaced.append(ModuleResult(rec, _rel_error(W, rec.W_new, H), seconds, n, excluded))
        rec.W_new = None
    elif isinstance(rec, Packed):
        err = None
        if rec.module is not None:
            block.set_submodule(rec.name[len(block_prefix) + 1:], rec.module)
        elif rec.W_hat is not None:
            mod.weight.data.copy_(rec.W_hat.to(mod.weight.dtype))
            err = _rel_error(W, rec.W_hat, H)
        result.modules.append(ModuleResult(rec, err, seconds, n, excluded))
        rec.W_hat, rec.module = None, None
    else:
        mod.weight.data.copy_(rec.W_hat.to(mod.weight.dtype))
        err = _rel_error(W, rec.W_hat, H, rec.error_trace, energy[0])
        result.modules.append(ModuleResult(rec, err, seconds, n, excluded))
        rec.W_hat = None        # export needs only codes and scales


def _counts(result: EngineResult) -> dict:
    return {"modules": len(result.modules), "adapters": len(result.adapters), "replaced": len(result.replaced),
            "skipped": len(result.skipped), "expert_tokens": set(result.expert_tokens)}


def _since(result: EngineResult, before: dict, seconds: float) -> dict:
    """What one block added to the result (for the resume store)."""
    out = {k: getattr(result, k)[n:] for k, n in before.items() if k != "expert_tokens"}
    out["expert_tokens"] = {k: v for k, v in result.expert_tokens.items() if k not in before["expert_tokens"]}
    return {**out, "seconds": seconds}


def _without_fused(targets: dict, fused: dict[str, str], method: Method, result: EngineResult) -> dict:
    """Targets less the fused expert projections, which this method cannot store; recorded once per module."""
    left = {fused[n] for n in targets if n in fused}
    why = "adds adapters, which a PEFT checkpoint cannot put on fused experts" if method.adapters else \
        "replaces whole blocks in calq's own format, which fused experts do not take"
    result.skipped += [{"name": m, "reason": f"{method.name} {why}; its experts keep the other stages' weights"}
                       for m in sorted(left)]
    return {n: m for n, m in targets.items() if n not in fused}


def _fallbacks(unreached: dict, method: Method, scale_dtype, originals: dict, result: EngineResult,
               phases: dict) -> None:
    """Experts no calibration token reached: the method's data-free fallback, or left as they are."""
    for name, mod in unreached.items():
        t0 = time.time()
        W = mod.weight.data.float().clone()
        rec = method.fallback(name, W, {"scale_dtype": scale_dtype})
        if rec is None:
            result.skipped.append({"name": name, "reason": f"no calibration token was routed to this expert and "
                                   f"{method.name} needs data; left as it was"})
            continue
        rec.info.update(tokens=0, fallback="no calibration token was routed to this expert")
        _install(rec, mod, W, None, originals.get(name), 0, time.time() - t0, result)
        phases["methods"] += time.time() - t0


def _summed(counts: dict[str, list[int]], group: Solo) -> dict[str, list[int]]:
    """Tokens routed to each expert, added up over the ranks."""
    if group.size == 1:
        return counts
    out = {}
    for part in group.gather_lists([counts]):
        for path, c in part.items():
            out[path] = [a + b for a, b in zip(out.get(path, [0] * len(c)), c, strict=True)]
    return out


def _solvers(seen: dict[str, nn.Linear], hess: Statistics, group: Solo) -> dict[str, int]:
    """The rank that solves each Linear. Linears sharing an input stay together (GPTQ factors their H once);
    a group costs about IC³ (the factorization) plus OC·IC² per Linear (the solve)."""
    by_input: dict[str, list[str]] = {}
    for name in seen:
        by_input.setdefault(hess.owner[name], []).append(name)
    parts = list(by_input.values())
    costs = []
    for part in parts:
        IC = seen[part[0]].weight.shape[1]
        costs.append(IC ** 3 + sum(seen[n].weight.shape[0] * IC ** 2 for n in part))
    return {n: r for part, r in zip(parts, group.assign(costs), strict=True) for n in part}


def _energies(method: Method, st: dict) -> tuple[float | None, float | None]:
    """tr(W H Wᵀ) of the weights the calibration forward ran with: the current ones, or the originals for stages
    calibrated on them (EoRA, PTQ1.61)."""
    e = st.get("output_energy")
    return (e, None) if method.calibrate_on == "current" else (None, e)


def _moved(rec, device):
    """The record with its tensor fields on device (to send it to other ranks, and to place it there)."""
    return replace(rec, **{f.name: getattr(rec, f.name).to(device) for f in fields(rec)
                           if isinstance(getattr(rec, f.name), torch.Tensor)})


@dataclass
class BlockContext:
    """What a block-scope method (Method.scope == "block") gets for one block."""

    block: nn.Module                    # on the device, in the compute dtype
    prefix: str                         # its module path, e.g. "model.layers.3"
    index: int
    targets: dict[str, nn.Linear]       # the stage's Linears in this block (full names)
    stats: dict[str, dict]              # per target: what `needs` asked for, as `apply` would get it
    inputs: list                        # [(hidden, kwargs)] on CPU along the compressed path
    fp_inputs: list | None              # the same along the full-precision path ("fp_path" in needs)
    fp_outputs: list | None             # the original block applied to fp_inputs [hidden] on CPU
    device: torch.device
    dtype: torch.dtype
    progress: Callable[[dict], None] | None = None

    def forward(self, inputs: list | None = None) -> list[torch.Tensor]:
        """The block's current outputs for `inputs` (default: the compressed path's), on CPU."""
        return [block_output(self.block(h.to(self.device), **to_device(kw, self.device))).cpu()
                for h, kw in (self.inputs if inputs is None else inputs)]


@dataclass
class PrepareContext:
    """What a method's model-level `prepare` gets: the calibration token windows and the engine itself."""

    ids: torch.Tensor                   # [N, T] calibration token ids
    device: torch.device
    seed: int
    compress: Callable                  # compress(model, stages) runs the same block loop on another model
    progress: Callable[[dict], None] | None = None


def _rel_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None, num: float | None = None,
               den: float | None = None) -> float | None:
    """‖X ΔWᵀ‖ / ‖X Wᵀ‖ = √(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) (H = 2/N XᵀX; the N/2 cancels). No H: not measured.
    num, den: those traces where the solve or the calibration forward already has them; each costs an OC·IC²
    GEMM to compute, as much as GPTQ's own solve."""
    if H is None:
        return None
    if num is None:
        dW = W - W_hat
        num = float(((dW @ H) * dW).sum())
    if den is None:
        den = float(((W @ H) * W).sum())
    return max(num, 0.0) ** 0.5 / max(den, 1e-30) ** 0.5


@torch.no_grad()
def run_blocks(blocks: nn.ModuleList, prefix: str, inputs: list, stages: list[Method], device,
               scale_dtype: torch.dtype, progress: Callable[[dict], None] | None = None,
               propagate: str = "quantized", compute_dtype: torch.dtype = torch.float32,
               rest_dtype: torch.dtype | None = None,
               onload: Callable[[int, nn.Module], None] | None = None,
               offload: Callable[[int, nn.Module, EngineResult], None] | None = None,
               stage_inputs: dict[int, list] | None = None,
               massive_ratio: float | None = None, moe: MoESettings | None = None, store=None,
               group: Solo = SOLO) -> EngineResult:
    """Compress every block in order; `inputs` is [(hidden [B, T, D], kwargs)] per batch, on CPU.

    propagate: "quantized" feeds each block the outputs of the compressed blocks before it (GPTQ);
    "fp" feeds it the full-precision outputs (AdaDim's and AWQ's reference code).
    A block is computed in compute_dtype on the device and rests in rest_dtype (its own dtype if None) on
    CPU, so only one block is ever upcast.
    onload(i, block) runs before block i is first used and offload(i, block, result) once it is back on CPU
    and finished: disk offload fills the block from safetensors there, and writes and drops it.
    stage_inputs: {index in stages: [(hidden, kwargs)]} for stages calibrated on their own data; each such
    stream is carried through the compressed blocks like `inputs`.
    massive_ratio: tokens above this multiple of the median token energy stay out of the statistics (Statistics).
    moe: fused experts become per-expert Linear targets (calibration/moe.py); experts the router sends fewer than
    moe.min_tokens tokens get a damped Hessian, and those it sends none the method's data-free `fallback`.
    store: a resume.BlockStore; its finished blocks are put back as they were saved, the rest saved as they finish.
    group: the ranks of a distributed run (calibration/distributed.py); `inputs` and `stage_inputs` hold this rank's
    share of the batches. Statistics are summed over the ranks, the solves of a stage shared out between them (each
    record then sent to all), and each rank carries its own share of the streams to the next block.
    """
    loop = _Loop(prefix, inputs, stages, device, scale_dtype, progress, propagate, compute_dtype, rest_dtype,
                 stage_inputs or {}, massive_ratio, moe, group)
    n_tokens = group.total(sum(h.shape[0] * h.shape[1] for h, _ in inputs))
    result = loop.result
    for i, block in enumerate(blocks):
        t_block = time.time()
        if progress:
            progress({"event": "block_start", "index": i, "total": len(blocks),
                      "methods": [s.name for s in stages], "elapsed": t_block - loop.t_start})
        if onload:
            onload(i, block)
        restored = store is not None and i < store.done         # finished by an earlier, interrupted run
        if restored:
            store.restore(i, block, f"{prefix}.{i}", result)
            if i == store.done - 1:
                store.resume_streams(inputs, loop.stage_inputs, loop.fp_inputs)
        else:
            group.block_started(i)
            before = _counts(result)
            loop.block(i, block)
            if store is not None:
                store.save(i, block, _since(result, before, time.time() - t_block), inputs, loop.stage_inputs,
                           loop.fp_inputs)
        if offload:
            offload(i, block, result)
        if not restored:
            result.block_seconds.append(time.time() - t_block)
        if progress:
            progress({"event": "block_end", "index": i, "total": len(blocks), "tokens": n_tokens,
                      "seconds": result.block_seconds[-1], "elapsed": time.time() - loop.t_start,
                      **({"restored": True} if restored else {})})
    return result


@dataclass
class _Block:
    """One block while it is compressed: what its stages share."""

    index: int
    module: nn.Module                   # on the device, in the compute dtype
    linears: dict[str, nn.Linear]
    originals: dict[str, torch.Tensor]  # its weights before any stage (when a stage reads them)
    routed: object                      # moe.unfused's view of its fused experts
    experts: set[str]
    fp_next: list | None                # the original block's outputs along the full-precision path
    fp_outs: list | None = None         # its full-precision outputs for `inputs`, once computed ("fp" propagate)


class _Loop:
    """The steps of run_blocks, over the state every block shares (see run_blocks for the arguments)."""

    def __init__(self, prefix, inputs, stages, device, scale_dtype, progress, propagate, compute_dtype, rest_dtype,
                 stage_inputs, massive_ratio, moe, group):
        self.prefix, self.inputs, self.stages, self.device = prefix, inputs, stages, device
        self.scale_dtype, self.progress, self.propagate = scale_dtype, progress, propagate
        self.compute_dtype, self.rest_dtype, self.stage_inputs = compute_dtype, rest_dtype, stage_inputs
        self.massive_ratio, self.moe, self.group = massive_ratio, moe, group
        self.result = EngineResult()
        self.phases = self.result.phase_seconds
        self.t_start = time.time()
        # The full-precision path, for methods that train towards the original model's outputs (PTQ1.61).
        self.fp_inputs = [(h, kw) for h, kw in inputs] if any("fp_path" in s.needs for s in stages) else None
        # A copy of each block's weights only for the stages that read them (it doubles the block's memory).
        self.keep_originals = any("original_weight" in s.needs or s.calibrate_on != "current" or s.adapters
                                  for s in stages)

    def forward(self, block, inputs, keep: bool):
        """The block's outputs for every batch, on CPU; keep=False runs it for the hooks alone."""
        outs = []
        for hidden, kwargs in inputs:
            out = block_output(block(hidden.to(self.device), **to_device(kwargs, self.device)))
            if keep:
                outs.append(out.cpu())
        return outs

    def advance(self, block, i, stream):
        """Replace each batch of a stream by the block's output for it in place: one batch at a time on the
        device, and never a second copy of the stream in RAM."""
        for j, (hidden, kwargs) in enumerate(stream):
            out = block_output(block(hidden.to(self.device), **to_device(kwargs, self.device)))
            if not torch.isfinite(out).all():
                raise CalqError(f"non-finite outputs from block {i} ({self.prefix}.{i}) after compression",
                                "try more bits, a larger dampening_frac, or fp32 compute (--device cpu)")
            stream[j] = (out.cpu(), kwargs)

    def block(self, i: int, module: nn.Module) -> None:
        """Every stage on one block, then its compressed outputs become the next block's inputs."""
        rest = self.rest_dtype or next(module.parameters()).dtype
        module.to(self.device, self.compute_dtype)
        moe_stack = ExitStack()
        name = f"{self.prefix}.{i}"
        routed = moe_stack.enter_context(unfused(module, name, self.moe))
        self.result.skipped += [{"name": n, "reason": f"fused experts left in full precision: {r}"}
                                for n, r in routed.left.items()]
        linears = find_linears(module, name)
        listed, routers = list_experts(module, name)
        b = _Block(i, module, linears, {}, routed, set(routed.experts) | listed, None)
        if self.keep_originals:
            b.originals = {n: m.weight.data.float().clone() for n, m in linears.items()}
        if self.fp_inputs is not None:
            t0 = time.perf_counter()
            b.fp_next = [block_output(module(h.to(self.device), **to_device(kw, self.device))).cpu()
                         for h, kw in self.fp_inputs]
            self.phases["propagate"] += time.perf_counter() - t0
        for k, method in enumerate(self.stages):
            targets = stage_targets(linears, method.config, routers)
            if method.adapters or method.scope == "block":
                targets = _without_fused(targets, routed.experts, method, self.result)
            if not targets:
                continue
            if method.data_free:
                self.data_free(b, method, targets)
                continue
            # experts_per_pass: the Hessians of a few experts at a time, one calibration forward each
            for part in expert_passes(targets, routed.experts, self.moe.experts_per_pass if self.moe else None):
                self.calibrate(b, k, method, part)
        b.originals = {}
        moe_stack.close()           # the fused parameters hold every expert's result already
        self.group.sync_module(module)
        self.propagate_outputs(b)
        module.to("cpu", rest)

    def propagate_outputs(self, b: _Block) -> None:
        """The next block sees this block's outputs with compressed weights (or the FP ones)."""
        t0 = time.perf_counter()
        if self.propagate == "fp" and b.fp_outs is not None:
            for j, out in enumerate(b.fp_outs):
                self.inputs[j] = (out, self.inputs[j][1])
        else:
            self.advance(b.module, b.index, self.inputs)
        for stream in self.stage_inputs.values():        # a stage's own data goes through the same compressed block
            self.advance(b.module, b.index, stream)
        self.phases["propagate"] += time.perf_counter() - t0
        if self.fp_inputs is not None:
            self.fp_inputs = [(h, kw) for h, (_, kw) in zip(b.fp_next, self.fp_inputs, strict=True)]

    def data_free(self, b: _Block, method: Method, targets: dict) -> None:
        """A stage that needs no calibration data: from the weights alone, no error measured."""
        if self.propagate == "fp" and b.fp_outs is None and self.inputs:      # the FP outputs, before compression
            t0 = time.perf_counter()
            b.fp_outs = self.forward(b.module, self.inputs, keep=True)
            self.phases["propagate"] += time.perf_counter() - t0
        for name, mod in targets.items():
            t0 = time.time()
            W = mod.weight.data.float().clone()
            rec = method.apply(name, W, {"scale_dtype": self.scale_dtype, "original_weight": b.originals.get(name)})
            _install(rec, mod, W, None, b.originals.get(name), 0, time.time() - t0, self.result)
            self.phases["methods"] += time.time() - t0

    def calibrate(self, b: _Block, k: int, method: Method, targets: dict) -> None:
        """One calibration forward with the stage's hooks on `targets`, then the method on each of them."""
        t0 = time.perf_counter()
        units = UnitInputs(b.module, f"{self.prefix}.{b.index}", targets, self.group)
        hess = Statistics(targets, "sample_covariance" in method.needs, self.massive_ratio, self.group)
        on_fp = method.calibrate_on == "fp" and self.fp_inputs is not None
        with hess, (units if "unit" in method.needs else nullcontext()), \
                _weights(b.linears, b.originals if method.calibrate_on in ("original", "fp") else None):
            want_fp = self.propagate == "fp" and b.fp_outs is None
            outs = self.forward(b.module, self.fp_inputs if on_fp else self.stage_inputs.get(k, self.inputs),
                                keep=want_fp)
        if want_fp:
            b.fp_outs = outs
        del outs
        for path, counts in _summed(b.routed.take_counts(), self.group).items():
            self.result.expert_tokens.setdefault(path, counts)
        self.phases["stats_forward"] += time.perf_counter() - t0
        self.phases["stats_accumulate"] += hess.seconds
        seen, unreached = {}, {}
        for name, mod in targets.items():
            if name not in hess.owner and name in b.experts:
                unreached[name] = mod           # an expert the router never chose
            elif name not in hess.owner:
                # e.g. Mamba's dt_proj: the model reads .weight directly, so no input is ever seen
                self.result.skipped.append({"name": name, "reason": "its forward is never called, so no "
                                            "calibration inputs were seen; left unquantized"})
            else:
                seen[name] = mod
        stats = {}
        for name in seen:
            H, n = hess.of(name, robust=method.robust_statistics)
            stats[name] = {"hessian": H, "tokens": n, "scale_dtype": self.scale_dtype,
                           "hessian_diag_all": hess.diag_all(name), "error_hessian": hess.of(name)[0],
                           "input_absmean": hess.absmean_of(name), "input_absmax": hess.absmax_of(name),
                           "original_weight": b.originals.get(name), "sample_covariance": hess.covariance_of(name),
                           "input_owner": hess.owner[name], "excluded_tokens": hess.excluded_of(name),
                           "output_energy": hess.energy_of(name)}
        few = few_token_hessians(stats, b.experts, self.moe) if self.moe else {}
        _fallbacks(unreached, method, self.scale_dtype, b.originals, self.result, self.phases)
        if method.scope == "block":
            self.apply_block(b, method, seen, stats, few)
        else:
            self.apply_each(b, method, seen, stats, few, hess, units)

    def apply_block(self, b: _Block, method: Method, seen: dict, stats: dict, few: dict) -> None:
        """A block-scope method (PTQ1.61, Quamba) on the whole block at once."""
        t0 = time.time()
        # Every rank runs the method on the whole calibration set: its observers and training steps walk the
        # samples in order (Quamba's percentile EMA, PTQ1.61's one-sample steps), which no sum of per-rank parts
        # reproduces, and a rank-0-only run would leave the others without its new submodules. sync_module
        # then makes rank 0's result everyone's.
        whole = [None if s is None else self.group.gather_lists(s) for s in (self.inputs, self.fp_inputs, b.fp_next)]
        prefix = f"{self.prefix}.{b.index}"
        ctx = BlockContext(b.module, prefix, b.index, seen, stats, *whole, self.device, self.compute_dtype,
                           self.progress)
        weights = {n: m.weight.data.float().clone() for n, m in seen.items()}
        records = method.apply_block(ctx)
        seconds = (time.time() - t0) / max(len(records), 1)
        for rec in records:
            st = stats.get(rec.name, {})       # empty for a replaced submodule that is no Linear
            rec.info.update(few.get(rec.name, {}))
            _install(rec, seen.get(rec.name), weights.get(rec.name), st.get("error_hessian"),
                     b.originals.get(rec.name), st.get("tokens", 0), seconds, self.result, b.module, prefix,
                     st.get("excluded_tokens", 0))
        self.phases["methods"] += time.time() - t0

    def apply_each(self, b: _Block, method: Method, seen: dict, stats: dict, few: dict, hess: Statistics,
                   units: UnitInputs) -> None:
        """The method Linear by Linear; over several ranks each solves its share and sends the records to all."""
        group = self.group
        # AdaDim scores a Linear with its earlier siblings compressed, so "unit" stages solve in order on every rank
        solver = _solvers(seen, hess, group) if group.size > 1 and "unit" not in method.needs else None
        done = {}
        for name, mod in seen.items():
            if solver is not None and solver[name] != group.rank:
                continue
            t0 = time.time()
            W = mod.weight.data.float().clone()               # [OC, IC]; .float() is a no-op in fp32
            st = stats[name]
            if "unit" in method.needs:
                # o/down are scored with H: the robust one, else a handful of attention-sink tokens decide the
                # layout (SmolLM2 layers 11 and 28: RTN-AdaDim took per-IC there, +6 % perplexity)
                st["unit_errors"] = units.errors_fn(name, mod, hess.shares_input(name), st["error_hessian"],
                                                     self.device)
            rec = method.apply(name, W, st)
            rec.info.update(few.get(name, {}))
            if getattr(rec, "error_trace", None) is not None and st["hessian"] is not st["error_hessian"]:
                rec.error_trace = None          # solved on another H (held-out massive tokens, extra damping)
            if solver is None:
                _install(rec, mod, W, st["error_hessian"], b.originals.get(name), st["tokens"], time.time() - t0,
                         self.result, excluded=st["excluded_tokens"], energy=_energies(method, st))
            else:
                done[name] = (_moved(rec, "cpu"), time.time() - t0)
            self.phases["methods"] += time.time() - t0
        if solver is not None:
            for name, mod in seen.items():          # each record from the rank that solved it to all, in order
                rec, seconds = group.broadcast(done.get(name), src=solver[name])
                st = stats[name]
                _install(_moved(rec, self.device), mod, mod.weight.data.float().clone(), st["error_hessian"],
                         b.originals.get(name), st["tokens"], seconds, self.result, excluded=st["excluded_tokens"],
                         energy=_energies(method, st))
