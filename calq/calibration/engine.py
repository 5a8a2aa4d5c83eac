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


class _Hessians:
    """One running XᵀX per distinct input: Linears fed the same tensor (q/k/v, gate/up) share it.

    massive_ratio: tokens whose energy ‖x‖² exceeds this multiple of the batch's median token energy are held apart
    (their rows are kept, few as they are), so a method can have H with or without them. Such tokens are attention
    sinks with massive activations (Sun et al. 2024): in SmolLM2-135M, 10 of 4096 tokens at layers 11 and 28's
    down_proj, 2·10³–4·10⁵ times the median energy (other tokens ≤ 7×) and 78–100 % of trace(H). GPTQ fitted to
    them doubles every other token's error; left out entirely, it pushes error into the very column they read.
    Methods with `robust_statistics` (GPTQ, EoRA) solve on H without them; importance statistics (absmax,
    absmean, the all-token diag of H that orders GPTQ's columns) and the other methods count every token.

    Sums (XᵀX, |x|, the covariance) are kept in fp64 and divided once at the end: an fp64 sum of fp32 terms hardly
    depends on their order, so the statistics come out the same however the batches are split between ranks
    (`group`, calibration/distributed.py), whose sums are added on leaving the `with` block.
    """

    def __init__(self, targets: dict[str, nn.Linear], sample_covariance: bool = False,
                 massive_ratio: float | None = None, group: Solo = SOLO):
        self.targets = targets
        self.want_cov = sample_covariance
        self.massive_ratio = massive_ratio
        self.group = group
        self.cov: dict[str, torch.Tensor] = {}           # Σ_s X̃_sᵀX̃_s, X̃_s = X_s / |max X_s| (CorDA); then / samples
        self.samples: dict[str, int] = {}
        self.owner: dict[str, str] = {}        # module -> module whose accumulator it shares
        self.S: dict[str, torch.Tensor] = {}             # Σ xxᵀ over the ordinary tokens, fp64
        self.H: dict[str, torch.Tensor] = {}             # 2/n·S, fp32, on leaving
        self.massive: dict[str, list[torch.Tensor]] = {}  # rows of the massive tokens [m, IC], per owner
        self.abssum: dict[str, torch.Tensor] = {}        # Σ |x| per input channel, every token, fp64
        self.absmean: dict[str, torch.Tensor] = {}       # abssum / n_all, fp32, on leaving
        self.absmax: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}                      # ordinary tokens
        self.n_all: dict[str, int] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles = []
        self.seconds = 0.0

    def __enter__(self):
        for name, mod in self.targets.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def _massive(self, X: torch.Tensor) -> torch.Tensor | None:
        """Bool [N] of the massive tokens among the rows of X [N, IC], or None if there are none."""
        if self.massive_ratio is None:
            return None
        energy = X.pow(2).sum(1)
        big = energy > self.massive_ratio * energy.median()
        return big if bool(big.any()) else None

    def _hook(self, name):
        def hook(_mod, args):
            X = args[0]
            if name not in self.owner:      # first batch: find who shares this input
                # Holding X keeps its memory from being freed and reused by a later, different input.
                self.owner[name] = self._seen.setdefault(X.data_ptr(), (name, X))[0]
            if self.owner[name] != name:
                return
            t0 = time.perf_counter()
            if self.want_cov:
                Xs = X.detach().float().reshape(X.shape[0], -1, X.shape[-1])      # [B, T, IC]
                Xs = Xs / Xs.amax(dim=(1, 2), keepdim=True).abs()                # per sample, signed max (spec)
                c = torch.einsum("bti,btj->ij", Xs, Xs).double()
                self.cov[name] = c if name not in self.cov else self.cov[name].add_(c)
                self.samples[name] = self.samples.get(name, 0) + Xs.shape[0]
            X = X.detach().reshape(-1, X.shape[-1]).float()       # [N, IC]
            if not torch.isfinite(X).all():
                raise CalqError(f"non-finite calibration activations entering {name}",
                                "check the model in fp32, or calibrate with other data")
            a, m = X.abs().sum(0).double(), X.abs().amax(0)
            self.absmax[name] = m if name not in self.absmax else torch.maximum(self.absmax[name], m)
            self.abssum[name] = a if name not in self.abssum else self.abssum[name].add_(a)
            self.n_all[name] = self.n_all.get(name, 0) + X.shape[0]
            big = self._massive(X)
            if big is not None:
                self.massive.setdefault(name, []).append(X[big])
                X = X[~big]
            if name not in self.S:
                self.S[name] = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
            self.S[name].add_(X.t() @ X)            # the GEMM in fp32, the running sum in fp64
            self.n[name] = self.n.get(name, 0) + X.shape[0]
            self.seconds += time.perf_counter() - t0
        return hook

    def __exit__(self, exc_type, *exc):
        for h in self._handles:
            h.remove()
        self._seen.clear()
        if exc_type is None:
            self._reduce()
            self._means()

    def _reduce(self) -> None:
        """Add up the other ranks' sums: after it each rank holds the statistics of every rank's batches."""
        if self.group.size == 1:
            return
        self.owner = self.group.union(self.owner)       # a rank may not see some inputs (an expert never routed)
        owners = sorted(set(self.owner.values()))
        counts = torch.tensor([[self.n.get(o, 0), self.n_all.get(o, 0), self.samples.get(o, 0)] for o in owners],
                              dtype=torch.int64)
        sums, maxes = [counts], []
        for o in owners:
            IC = self.targets[o].weight.shape[1]
            dev = self.targets[o].weight.device
            self.S.setdefault(o, torch.zeros(IC, IC, dtype=torch.float64, device=dev))
            self.abssum.setdefault(o, torch.zeros(IC, dtype=torch.float64, device=dev))
            self.absmax.setdefault(o, torch.zeros(IC, device=dev))          # |x| ≥ 0: zero changes no max
            sums += [self.S[o], self.abssum[o]]
            maxes.append(self.absmax[o])
            if self.want_cov:
                sums.append(self.cov.setdefault(o, torch.zeros(IC, IC, dtype=torch.float64, device=dev)))
        self.group.sum_(sums)
        self.group.max_(maxes)
        for o, (n, n_all, samples) in zip(owners, counts.tolist(), strict=True):
            self.n[o], self.n_all[o] = n, n_all
            if self.want_cov:
                self.samples[o] = samples
        # the massive rows of every rank's batches, in rank order, which is batch order (shares are contiguous)
        rows = self.group.gather_lists([(o, x.cpu()) for o in owners for x in self.massive.get(o, [])])
        self.massive = {}
        for o, x in rows:
            self.massive.setdefault(o, []).append(x.to(self.S[o].device))

    def _means(self) -> None:
        for o, S in self.S.items():
            n = self.n[o]
            self.H[o] = S.mul_(2.0 / n).float() if n else torch.zeros(S.shape, device=S.device)
            self.absmean[o] = (self.abssum[o] / max(self.n_all[o], 1)).float()
        for o, c in self.cov.items():
            self.cov[o] = (c / self.samples[o]).float()
        self.S, self.abssum = {}, {}

    def excluded_of(self, name: str) -> int:
        return sum(x.shape[0] for x in self.massive.get(self.owner[name], []))

    def of(self, name: str, robust: bool = True) -> tuple[torch.Tensor, int]:
        """(H, tokens): without the massive tokens (robust), or over every token."""
        owner = self.owner[name]
        H, n = self.H[owner], self.n[owner]
        if robust or owner not in self.massive:
            return H, n
        M = torch.cat(self.massive[owner])                  # [m, IC]
        n_all = n + M.shape[0]
        return (H * (n / n_all)).addmm_(M.t(), M, alpha=2.0 / n_all), n_all

    def diag_all(self, name: str) -> torch.Tensor:
        """diag of H over every token [IC]: what orders GPTQ's columns."""
        owner = self.owner[name]
        d = torch.diagonal(self.H[owner]).clone()
        if owner not in self.massive:
            return d
        M = torch.cat(self.massive[owner])
        n, n_all = self.n[owner], self.n[owner] + M.shape[0]
        return d * (n / n_all) + 2.0 / n_all * M.pow(2).sum(0)

    def absmean_of(self, name: str) -> torch.Tensor:
        return self.absmean[self.owner[name]]

    def absmax_of(self, name: str) -> torch.Tensor:
        return self.absmax[self.owner[name]]

    def covariance_of(self, name: str) -> torch.Tensor | None:
        owner = self.owner[name]
        return self.cov.get(owner)

    def shares_input(self, name: str) -> bool:
        return sum(o == self.owner[name] for o in self.owner.values()) > 1


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
             block: nn.Module | None = None, block_prefix: str = "", excluded: int = 0) -> None:
    """Put a method's result into the model and the run's records. W: the weight the method saw; W0: the
    weight before any stage. Dense tensors are dropped from records once the model holds them."""
    if isinstance(rec, Adapter):
        base = W if rec.W_base is None else rec.W_base
        mod.weight.data.copy_(base.to(mod.weight.dtype))
        attach_adapter(mod, rec.A, rec.B)
        result.adapters.append(AdapterResult(rec, _rel_error(W0, base, H), _rel_error(W0, base + rec.B @ rec.A, H)))
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
        result.modules.append(ModuleResult(rec, _rel_error(W, rec.W_hat, H), seconds, n, excluded))
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


def _solvers(seen: dict[str, nn.Linear], hess: _Hessians, group: Solo) -> dict[str, int]:
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


def _rel_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> float | None:
    # ||X ΔWᵀ||² = (N/2)·tr(ΔW H ΔWᵀ) with H = 2/N XᵀX; the N/2 cancels in the ratio. No H: not measured.
    if H is None:
        return None
    dW = W - W_hat
    num = ((dW @ H) * dW).sum()
    den = ((W @ H) * W).sum()
    return float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt())


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
    massive_ratio: tokens above this multiple of the median token energy stay out of the statistics (_Hessians).
    moe: fused experts become per-expert Linear targets (calibration/moe.py); experts the router sends fewer than
    moe.min_tokens tokens get a damped Hessian, and those it sends none the method's data-free `fallback`.
    store: a resume.BlockStore; its finished blocks are put back as they were saved, the rest saved as they finish.
    group: the ranks of a distributed run (calibration/distributed.py); `inputs` and `stage_inputs` hold this rank's
    share of the batches. Statistics are summed over the ranks, the solves of a stage shared out between them (each
    record then sent to all), and each rank carries its own share of the streams to the next block.
    """
    stage_inputs = stage_inputs or {}
    result = EngineResult()
    phases = result.phase_seconds
    t_start = time.time()
    n_tokens = group.total(sum(h.shape[0] * h.shape[1] for h, _ in inputs))

    def forward(block, inputs, keep: bool):
        """The block's outputs for every batch, on CPU; keep=False runs it for the hooks alone."""
        outs = []
        for hidden, kwargs in inputs:
            out = block_output(block(hidden.to(device), **to_device(kwargs, device)))
            if keep:
                outs.append(out.cpu())
        return outs

    def advance(block, i, stream):
        """Replace each batch of a stream by the block's output for it in place: one batch at a time on the
        device, and never a second copy of the stream in RAM."""
        for j, (hidden, kwargs) in enumerate(stream):
            out = block_output(block(hidden.to(device), **to_device(kwargs, device)))
            if not torch.isfinite(out).all():
                raise CalqError(f"non-finite outputs from block {i} ({prefix}.{i}) after compression",
                                "try more bits, a larger dampening_frac, or fp32 compute (--device cpu)")
            stream[j] = (out.cpu(), kwargs)

    def calibrate(block, i, k, method, targets, linears, originals, routed, experts, fp_next, fp_outs):
        """One calibration forward with the stage's hooks on `targets`, then the method on each of them.
        Returns the block's full-precision outputs (fp_outs) once a forward computed them."""
        t0 = time.perf_counter()
        units = UnitInputs(block, f"{prefix}.{i}", targets, group)
        hess = _Hessians(targets, "sample_covariance" in method.needs, massive_ratio, group)
        on_fp = method.calibrate_on == "fp" and fp_inputs is not None
        with hess, (units if "unit" in method.needs else nullcontext()), \
                _weights(linears, originals if method.calibrate_on in ("original", "fp") else None):
            want_fp = propagate == "fp" and fp_outs is None
            outs = forward(block, fp_inputs if on_fp else stage_inputs.get(k, inputs), keep=want_fp)
        if want_fp:
            fp_outs = outs
        del outs
        for path, counts in _summed(routed.take_counts(), group).items():
            result.expert_tokens.setdefault(path, counts)
        phases["stats_forward"] += time.perf_counter() - t0
        phases["stats_accumulate"] += hess.seconds
        seen, unreached = {}, {}
        for name, mod in targets.items():
            if name not in hess.owner and name in experts:
                unreached[name] = mod           # an expert the router never chose
                continue
            if name not in hess.owner:
                # e.g. Mamba's dt_proj: the model reads .weight directly, so no input is ever seen
                result.skipped.append({"name": name, "reason": "its forward is never called, so no "
                                       "calibration inputs were seen; left unquantized"})
                continue
            seen[name] = mod
        stats = {}
        for name in seen:
            H, n = hess.of(name, robust=method.robust_statistics)
            stats[name] = {"hessian": H, "tokens": n, "scale_dtype": scale_dtype,
                           "hessian_diag_all": hess.diag_all(name), "error_hessian": hess.of(name)[0],
                           "input_absmean": hess.absmean_of(name), "input_absmax": hess.absmax_of(name),
                           "original_weight": originals.get(name), "sample_covariance": hess.covariance_of(name),
                           "input_owner": hess.owner[name], "excluded_tokens": hess.excluded_of(name)}
        few = few_token_hessians(stats, experts, moe) if moe else {}
        _fallbacks(unreached, method, scale_dtype, originals, result, phases)
        if method.scope == "block":
            t0 = time.time()
            # Every rank runs the method on the whole calibration set: its observers and training steps walk the
            # samples in order (Quamba's percentile EMA, PTQ1.61's one-sample steps), which no sum of per-rank parts
            # reproduces, and a rank-0-only run would leave the others without its new submodules. sync_module
            # then makes rank 0's result everyone's.
            whole = [None if s is None else group.gather_lists(s) for s in (inputs, fp_inputs, fp_next)]
            ctx = BlockContext(block, f"{prefix}.{i}", i, seen, stats, *whole, device, compute_dtype, progress)
            weights = {n: m.weight.data.float().clone() for n, m in seen.items()}
            records = method.apply_block(ctx)
            seconds = (time.time() - t0) / max(len(records), 1)
            for rec in records:
                st = stats.get(rec.name, {})       # empty for a replaced submodule that is no Linear
                rec.info.update(few.get(rec.name, {}))
                _install(rec, seen.get(rec.name), weights.get(rec.name), st.get("error_hessian"),
                         originals.get(rec.name), st.get("tokens", 0), seconds, result, block, f"{prefix}.{i}",
                         st.get("excluded_tokens", 0))
            phases["methods"] += time.time() - t0
            del hess, units, ctx
            return fp_outs
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
                st["unit_errors"] = units.errors_fn(name, mod, hess.shares_input(name), st["hessian"], device)
            rec = method.apply(name, W, st)
            rec.info.update(few.get(name, {}))
            if solver is None:
                _install(rec, mod, W, st["error_hessian"], originals.get(name), st["tokens"], time.time() - t0,
                         result, excluded=st["excluded_tokens"])
            else:
                done[name] = (_moved(rec, "cpu"), time.time() - t0)
            phases["methods"] += time.time() - t0
        if solver is not None:
            for name, mod in seen.items():          # each record from the rank that solved it to all, in order
                rec, seconds = group.broadcast(done.get(name), src=solver[name])
                st = stats[name]
                _install(_moved(rec, device), mod, mod.weight.data.float().clone(), st["error_hessian"],
                         originals.get(name), st["tokens"], seconds, result, excluded=st["excluded_tokens"])
        del hess, units
        return fp_outs

    # The full-precision path, for methods that train towards the original model's outputs (PTQ1.61).
    fp_inputs = [(h, kw) for h, kw in inputs] if any("fp_path" in s.needs for s in stages) else None
    # A copy of each block's weights only for the stages that read them (it doubles the block's memory).
    keep_originals = any("original_weight" in s.needs or s.calibrate_on != "current" or s.adapters for s in stages)

    for i, block in enumerate(blocks):
        t_block = time.time()
        if progress:
            progress({"event": "block_start", "index": i, "total": len(blocks),
                      "methods": [s.name for s in stages], "elapsed": t_block - t_start})
        if onload:
            onload(i, block)
        if store is not None and i < store.done:       # finished by an earlier, interrupted run
            store.restore(i, block, f"{prefix}.{i}", result)
            if i == store.done - 1:
                store.resume_streams(inputs, stage_inputs, fp_inputs)
            if offload:
                offload(i, block, result)
            if progress:
                progress({"event": "block_end", "index": i, "total": len(blocks), "tokens": n_tokens,
                          "seconds": result.block_seconds[-1], "elapsed": time.time() - t_start, "restored": True})
            continue
        group.block_started(i)
        before = _counts(result)
        rest = rest_dtype or next(block.parameters()).dtype
        block.to(device, compute_dtype)
        moe_stack = ExitStack()
        routed = moe_stack.enter_context(unfused(block, f"{prefix}.{i}", moe))
        result.skipped += [{"name": n, "reason": f"fused experts left in full precision: {r}"}
                           for n, r in routed.left.items()]
        linears = find_linears(block, f"{prefix}.{i}")
        listed, routers = list_experts(block, f"{prefix}.{i}")
        experts = set(routed.experts) | listed
        # one block's weights before any stage: what "original_weight" and the adapters' errors refer to
        originals = {n: m.weight.data.float().clone() for n, m in linears.items()} if keep_originals else {}
        fp_outs = None
        fp_next = None
        if fp_inputs is not None:
            t0 = time.perf_counter()
            fp_next = [block_output(block(h.to(device), **to_device(kw, device))).cpu() for h, kw in fp_inputs]
            phases["propagate"] += time.perf_counter() - t0
        for k, method in enumerate(stages):
            targets = stage_targets(linears, method.config, routers)
            if method.adapters or method.scope == "block":
                targets = _without_fused(targets, routed.experts, method, result)
            if not targets:
                continue
            if method.data_free:
                if propagate == "fp" and fp_outs is None and inputs:      # the FP outputs, before compression
                    t0 = time.perf_counter()
                    fp_outs = forward(block, inputs, keep=True)
                    phases["propagate"] += time.perf_counter() - t0
                for name, mod in targets.items():       # from the weights alone; no error measured
                    t0 = time.time()
                    W = mod.weight.data.float().clone()
                    rec = method.apply(name, W, {"scale_dtype": scale_dtype, "original_weight": originals.get(name)})
                    _install(rec, mod, W, None, originals.get(name), 0, time.time() - t0, result)
                    phases["methods"] += time.time() - t0
                continue
            # experts_per_pass: the Hessians of a few experts at a time, one calibration forward each
            for part in expert_passes(targets, routed.experts, moe.experts_per_pass if moe else None):
                fp_outs = calibrate(block, i, k, method, part, linears, originals, routed, experts, fp_next,
                                    fp_outs)
        del originals
        moe_stack.close()           # the fused parameters hold every expert's result already
        group.sync_module(block)
        # Propagate: the next block sees this block's outputs with compressed weights (or the FP ones).
        t0 = time.perf_counter()
        if propagate == "fp" and fp_outs is not None:
            for j, out in enumerate(fp_outs):
                inputs[j] = (out, inputs[j][1])
        else:
            advance(block, i, inputs)
        for stream in stage_inputs.values():        # a stage's own data goes through the same compressed block
            advance(block, i, stream)
        phases["propagate"] += time.perf_counter() - t0
        if fp_inputs is not None:
            fp_inputs = [(h, kw) for h, (_, kw) in zip(fp_next, fp_inputs, strict=True)]
        block.to("cpu", rest)
        if store is not None:
            store.save(i, block, _since(result, before, time.time() - t_block), inputs, stage_inputs, fp_inputs)
        if offload:
            offload(i, block, result)
        result.block_seconds.append(time.time() - t_block)
        if progress:
            progress({"event": "block_end", "index": i, "total": len(blocks), "tokens": n_tokens,
                      "seconds": result.block_seconds[-1], "elapsed": time.time() - t_start})
    return result
