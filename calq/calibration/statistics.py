"""What the engine collects from a block's calibration forward, per distinct Linear input."""

from __future__ import annotations

import time

import torch
from torch import nn

from calq.calibration.distributed import SOLO, Solo
from calq.errors import CalqError


class Statistics:
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
        self.energy: dict[str, torch.Tensor] = {}        # Σ ‖W x‖² per target over the ordinary tokens, fp64
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._mask: dict[str, torch.Tensor | None] = {}  # the current batch's massive tokens, per owner
        self._handles = []
        self.seconds = 0.0

    def __enter__(self):
        for name, mod in self.targets.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
            self._handles.append(mod.register_forward_hook(self._out_hook(name)))
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
            self._mask[name] = big
            if big is not None:
                self.massive.setdefault(name, []).append(X[big])
                X = X[~big]
            if name not in self.S:
                self.S[name] = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
            self.S[name].add_(X.t() @ X)            # the GEMM in fp32, the running sum in fp64
            self.n[name] = self.n.get(name, 0) + X.shape[0]
            self.seconds += time.perf_counter() - t0
        return hook

    def _out_hook(self, name):
        """Σ ‖W x‖² over the ordinary tokens from the Linear's own output: tr(W H Wᵀ) (the denominator of the
        relative error) without the OC·IC² GEMM it costs from H."""
        def hook(mod, _args, out):
            owner = self.owner.get(name)
            if owner is None or not isinstance(out, torch.Tensor) or hasattr(mod, "calq_lora_A"):
                return          # an adapter's hook has added its path to `out` already
            t0 = time.perf_counter()
            Y = out.detach().reshape(-1, out.shape[-1]).float()
            if getattr(mod, "bias", None) is not None:
                Y = Y - mod.bias.detach().float()
            big = self._mask.get(owner)
            if big is not None:
                Y = Y[~big]
            e = (Y * Y).sum(dtype=torch.float64)
            self.energy[name] = e if name not in self.energy else self.energy[name].add_(e)
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
        names = sorted(self.owner)
        energy = torch.stack([self.energy.get(n, torch.zeros((), dtype=torch.float64)).cpu() for n in names])
        sums.append(energy)
        self.group.sum_(sums)
        self.group.max_(maxes)
        self.energy = dict(zip(names, energy, strict=True))
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
        # as H: 2/n, in fp32 (the last bits of an fp64 sum could depend on how batches were split between ranks)
        self.energy = {k: float(torch.tensor(float(e) * 2.0 / max(self.n[self.owner[k]], 1), dtype=torch.float32))
                       for k, e in self.energy.items()}

    def energy_of(self, name: str) -> float | None:
        """tr(W H Wᵀ) for the weights the Linear ran with during calibration (robust H), from its outputs."""
        return self.energy.get(name)

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
