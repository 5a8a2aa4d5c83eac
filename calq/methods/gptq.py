"""GPTQ as pure functions: accumulate the Hessian, then solve one Linear column by column.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
Algorithm 1 (lazy batch updates over column blocks, Cholesky form of the inverse Hessian).

Conventions: W is [OC, IC], X is [N, IC] (tokens first), H = 2/N Σ x xᵀ is [IC, IC] and kept in fp32.
All rounding goes through `quantizer.py`, so codes, scale and zero follow the checkpoint convention of
`quantize_rtn` for both layouts, and W_hat == dequantize(codes, scale, zero) exactly.
Group scales:
  "oc", group_size -1     one scale per row, from the full rows of W up front (as the reference GPTQ)
  "oc", groups            a group's scale from its error-corrected columns when the solver reaches its first
                          column; with act-order, static groups: every group's scale from the unpermuted W up
                          front, so each column keeps its original group's scale and no g_idx is needed
  "ic"                    a column's scales (groups of g rows) from its error-corrected values when it is quantized
The solve runs in fp32 like the reference; damping, raised on a failed Cholesky, is what keeps it stable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calq.methods.quantizer import QuantArgs, dequantize, qparams, quantize, quantize_rtn


@dataclass
class GPTQResult:
    codes: torch.Tensor             # int8 [OC, IC], original column order
    scale: torch.Tensor             # [OC, G] ("oc") or [G, IC] ("ic"), as quantize_rtn
    zero: torch.Tensor | None       # same shape as scale; None if symmetric
    W_hat: torch.Tensor             # fp32 [OC, IC] dequantized weight
    loss: float                     # Σ (w - q)² / d² / 2 over all columns (paper's Losses); nan on fallback
    damp: float                     # dampening fraction finally used
    fallback: bool                  # True if every Cholesky failed and the layer was rounded with RTN
    error_trace: float | None = None    # tr(ΔW H ΔWᵀ) against the undamped H, from the solve's own losses


def accumulate_hessian(H: torch.Tensor | None, X: torch.Tensor, n_seen: int) -> tuple[torch.Tensor, int]:
    """Fold X [N, IC] into the running mean H = 2/n Σ x xᵀ. Returns (H [IC, IC] fp32, n_seen + N)."""
    X = X.float()
    N, IC = X.shape
    if H is None:
        H = torch.zeros(IC, IC, device=X.device)
    if N == 0:
        return H, n_seen
    n_new = n_seen + N
    # A running mean rather than a running sum keeps H's magnitude independent of the token count.
    H.mul_(n_seen / n_new).addmm_(X.t(), X, alpha=2.0 / n_new)
    return H, n_new


@dataclass
class Factor:
    """What the solve needs from H alone, shared by the Linears fed the same input (q/k/v, gate/up)."""

    dead: torch.Tensor              # bool [IC]: inputs that never move (diag H == 0)
    perm: torch.Tensor              # column order of the solve (act-order), [IC]
    U: torch.Tensor | None          # upper Cholesky factor of the damped, permuted H⁻¹; None: no factor, use RTN
    damp: float                     # dampening fraction finally used
    lam: float = 0.0                # what it added to the diagonal: damp · mean diag H


def factor_hessian(H: torch.Tensor, dampening_frac: float = 0.01, actorder: bool = False, max_damp_tries: int = 5,
                   order: torch.Tensor | None = None) -> Factor:
    """Dead inputs, act-order permutation and the inverse Cholesky factor of H [IC, IC] (fp32).

    order: with actorder, the importance that sorts the columns (default diag H)."""
    H = H.detach().float().clone()                          # [IC, IC]; the caller's H may serve other methods
    # Dead inputs: the column never influences the output, so any value works; 0 keeps it out of the scales.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if actorder:
        perm = torch.argsort(torch.diag(H) if order is None else order.to(H.device), descending=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    U, damp = inverse_cholesky(H, dampening_frac, max_damp_tries)
    return Factor(dead, perm, U, damp, damp * torch.diag(H).mean().item())


def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, args: QuantArgs, block_size: int = 128,
                  dampening_frac: float = 0.01, actorder: bool = False, max_damp_tries: int = 5,
                  order: torch.Tensor | None = None, factor: Factor | None = None) -> GPTQResult:
    """Quantize W [OC, IC] against H [IC, IC] (Algorithm 1). Never raises on a numerical failure.

    order: with actorder, the importance that sorts the columns (default diag H). factor: `factor_hessian` of
    this H with these settings, computed once for every Linear that shares the input (H may then be None)."""
    W_orig = W
    W = W.detach().float().clone()                          # [OC, IC]
    OC, IC = W.shape
    g = args.group_len((OC, IC))
    if factor is None:
        factor = factor_hessian(H, dampening_frac, actorder, max_damp_tries, order)
    W[:, factor.dead] = 0
    perm, Hinv, damp = factor.perm, factor.U, factor.damp

    # "oc" scales computed once up front; "ic" scales always follow the column being quantized.
    static = args.layout == "oc" and (actorder or args.group_size == -1)
    if args.layout == "oc":
        if static:
            scale, zero = qparams(W.reshape(OC, IC // g, g), args)           # [OC, G]
        else:
            scale = torch.zeros(OC, IC // g, device=W.device)
            zero = None if args.symmetric else torch.zeros_like(scale)
            # A group's columns must all sit in one lazy block to be read error-corrected at its first column.
            block_size = max(g, block_size // g * g)
    else:
        scale = torch.zeros(OC // g, IC, device=W.device)
        zero = None if args.symmetric else torch.zeros_like(scale)

    if Hinv is None:
        return _rtn_fallback(W_orig, args, damp)
    # The solve runs on Wᵀ [IC, OC] in the permuted order: a column of W is a contiguous row there, so the
    # per-column update is one in-place rank-1 `addr_` and the lazy-block update one in-place `addmm_`.
    Wt = W[:, perm].t().contiguous()                        # [IC, OC]
    cols = perm.tolist()                                    # permuted position -> original column
    Qt = torch.zeros_like(Wt)
    codes_t = torch.zeros_like(Wt)
    losses = torch.zeros(IC, device=W.device)               # Σ over rows of (w − q)² / d² / 2, per column
    for i1 in range(0, IC, block_size):
        i2 = min(i1 + block_size, IC)
        W1 = Wt[i1:i2]                                      # [B, OC], a view: updated in place
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # Two levels of lazy updates: rank-1 updates inside a sub-block of SUB columns, one GEMM per sub-block for
        # the rest of the block (the same arithmetic, a quarter of the level-2 work at SUB = B/4).
        for j1 in range(0, i2 - i1, SUB):
            j2 = min(j1 + SUB, i2 - i1)
            for i in range(j1, j2):
                w, d, c = W1[i], Hinv1[i, i], cols[i1 + i]
                s, z = _column_qparams(W1, i, c, scale, zero, g, args, static)
                q = quantize(w, s, z, args)                 # [OC]
                Qt[i1 + i] = dequantize(q, s, z)
                codes_t[i1 + i] = q
                err1 = (w - Qt[i1 + i]) / d
                losses[i1 + i] = err1.pow(2).sum() / 2
                W1[i + 1:j2].addr_(Hinv1[i, i + 1:j2], err1, alpha=-1)
                Err1[i] = err1
            W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1)
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)    # the block's error reaches later columns at once

    inv = torch.argsort(perm)
    W_hat = Qt[inv].t().contiguous()
    if not torch.isfinite(W_hat).all():
        return _rtn_fallback(W_orig, args, damp)
    # The losses sum to tr(ΔW (H + λI) ΔWᵀ)/2 (OBS; exact up to rounding): the error against H itself is then
    # 2·Σ losses − λ‖ΔW‖², an O(OC·IC) step instead of the OC·IC² GEMM that recomputing it costs. Dead columns
    # add nothing: their W is 0 in the solve and their row of H is 0.
    loss = losses.sum().item()
    trace = 2 * loss - factor.lam * (W - W_hat).pow(2).sum().item()
    return GPTQResult(codes_t[inv].t().to(torch.int8).contiguous(), scale, zero, W_hat, loss, damp, False,
                      max(trace, 0.0))


def _column_qparams(W1, i, c, scale, zero, g, args, static):
    """Scale/zero [OC] for the block row W1[i] (a column of W, original column c) of W1 [B, OC]; records new
    params in scale/zero."""
    OC = W1.shape[1]
    if args.layout == "ic":
        s, z = qparams(W1[i].reshape(OC // g, g), args)     # [OC/g]
        scale[:, c] = s
        if z is not None:
            zero[:, c] = z
        return s.repeat_interleave(g), None if z is None else z.repeat_interleave(g)
    if not static and c % g == 0:
        s, z = qparams(W1[i:i + g].t(), args)               # [OC]
        scale[:, c // g] = s
        if z is not None:
            zero[:, c // g] = z
    return scale[:, c // g], None if zero is None else zero[:, c // g]


SUB = 32     # columns per inner lazy batch of the solve


def inverse_cholesky(H: torch.Tensor, frac: float, tries: int) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor U of (H + frac·mean(diag H)·I)⁻¹ = UᵀU, raising frac tenfold after each failure.

    With J the reversal (J H J = L̃ L̃ᵀ), H = (J L̃ J)(J L̃ J)ᵀ with J L̃ J upper, so U = (J L̃ J)⁻¹ = J L̃⁻¹ J: one
    Cholesky and one triangular inverse (BLAS-3 TRSM) instead of Cholesky, cholesky_inverse and a second
    Cholesky; cholesky_inverse ran single-threaded here (5504²: 22.6 s against 3.3 s, same U to 4e-7)."""
    n = H.shape[0]
    eye = torch.eye(n, device=H.device)
    mean_diag = torch.diag(H).mean()
    for attempt in range(tries + 1):
        if attempt:
            frac = 10 * frac if frac > 0 else 0.01          # a zero fraction cannot grow by scaling
        L, info = torch.linalg.cholesky_ex((H + frac * mean_diag * eye).flip(0, 1))
        if info.item() == 0 and torch.isfinite(L).all():
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all() and bool((torch.diagonal(U) > 0).all()):
                return U, frac
    return None, frac


def _rtn_fallback(W: torch.Tensor, args: QuantArgs, damp: float) -> GPTQResult:
    codes, scale, zero, W_hat = quantize_rtn(W.detach().float(), args)
    return GPTQResult(codes, scale, zero, W_hat, float("nan"), damp, True)


# --- the recipe stage -------------------------------------------------------------------------------------

from pydantic import Field, field_validator  # noqa: E402

from calq.methods.base import Compressed  # noqa: E402
from calq.methods.registry import WeightQuantConfig, register  # noqa: E402


class GPTQConfig(WeightQuantConfig):
    dampening_frac: float = Field(0.01, ge=0, le=1)   # fraction of mean diag(H) added to the diagonal
    block_size: int = Field(128, ge=1)                # columns per lazy batch update
    actorder: bool = True                             # "static": reorder while solving, no g_idx stored

    @field_validator("actorder", mode="before")
    @classmethod
    def _actorder(cls, v):
        # llm-compressor spellings; "group"/"dynamic" need g_idx, which compressed-tensors 0.20 rejects.
        if v in (None, False, "none", "null"):
            return False
        if v in (True, "static", "weight"):
            return True
        raise ValueError(f"{v!r} is not supported; use static (or weight), or null to disable act-order")


from calq.methods.rtn import WeightQuantMethod, resolve_layout  # noqa: E402


@register("gptq")
class GPTQ(WeightQuantMethod):
    Config = GPTQConfig
    robust_statistics = True
    _factor: tuple | None = None       # (input owner, H) -> Factor of the last Hessian, reused by its siblings

    @property
    def needs(self):
        return ("hessian", *super().needs)

    def apply(self, name, W, stats) -> Compressed:
        cfg = self.config
        args, info = resolve_layout(cfg, W, stats)      # AdaDim decides with RTN; GPTQ runs once, in that layout
        # Columns in the order of every token's energy: a channel that only massive tokens excite comes first and
        # takes no error from the others, so those tokens keep RTN's error there while the rest get GPTQ's.
        H, order = stats["hessian"], stats.get("hessian_diag_all")
        key = (stats.get("input_owner"), H.data_ptr())
        if self._factor is None or self._factor[0] != key:       # siblings (q/k/v, gate/up) come one after another
            self._factor = (key, factor_hessian(H, cfg.dampening_frac, cfg.actorder, order=order))
        r = gptq_quantize(W, H, args, cfg.block_size, cfg.dampening_frac, cfg.actorder, factor=self._factor[1])
        info.update(damp=r.damp, fallback_rtn=r.fallback)
        return Compressed(name, "gptq", cfg.bits, args.layout, cfg.group_size, cfg.symmetric, r.codes, r.scale,
                          r.zero, r.W_hat, loss=None if r.fallback else r.loss, info=info, error_trace=r.error_trace)
