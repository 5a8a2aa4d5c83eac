"""Pruning, N:M semi-structured or unstructured, so that compensation of sparsity can be shown.

  magnitude  scores |W|
  wanda      scores |W|·‖x_j‖ (Sun et al. 2023; ‖x_j‖² ∝ diag(H))
  sparsegpt  Frantar & Alistarh 2023: GPTQ's column-by-column solve with "set to zero" as the rounding, so the
             kept weights absorb each pruned weight's output error through the inverse Hessian; the mask is
             chosen on the fly by w²/[H⁻¹]²_jj (per group of M columns for N:M, per block of columns otherwise)
N:M keeps the N highest scores in every M consecutive input columns of a row; a fraction p removes the p·IC lowest
of each row (magnitude, wanda) or the lowest p of each lazy block (sparsegpt, as its reference code).
The pruned weight is stored dense (zeros included).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator

from calq.methods.base import Replaced
from calq.methods.gptq import inverse_cholesky
from calq.methods.registry import Method, StageConfig, register


class PruneConfig(StageConfig):
    sparsity: str = "2:4"           # "N:M", or a fraction such as "0.5"
    criterion: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    dampening_frac: float = Field(0.01, ge=0, le=1)   # sparsegpt only: as GPTQ's
    block_size: int = Field(128, ge=1)                # sparsegpt only: columns per lazy batch update

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v):
        m = re.fullmatch(r"(\d+):(\d+)", v)
        if m and 0 < int(m[1]) < int(m[2]):
            return v
        try:
            if 0 < float(v) < 1:
                return v
        except ValueError:
            pass
        raise ValueError(f"{v!r} is not N:M with 0 < N < M (e.g. 2:4) or a fraction in (0, 1) (e.g. 0.5)")


def _nm(sparsity: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d+):(\d+)", sparsity)
    return (int(m[1]), int(m[2])) if m else None


def prune_mask(score: torch.Tensor, sparsity: str) -> torch.Tensor:
    """Boolean keep-mask [OC, IC] from scores [OC, IC]."""
    OC, IC = score.shape
    nm = _nm(sparsity)
    if nm:
        n, M = nm
        g = score.reshape(OC, IC // M, M)                            # [OC, IC/M, M]
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep.scatter_(2, g.topk(n, dim=2).indices, True)
        return keep.reshape(OC, IC)
    k = int(round(float(sparsity) * IC))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: str, block_size: int = 128,
                    dampening_frac: float = 0.01) -> torch.Tensor | None:
    """SparseGPT: W [OC, IC] pruned against H [IC, IC] (any positive multiple of XᵀX). Returns the pruned fp32
    weight, its zeros exactly where the mask says and its kept weights updated to absorb the pruned ones' error;
    None if H has no Cholesky factor even after raising the damping."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    OC, IC = W.shape
    nm = _nm(sparsity)
    if nm:
        block_size = max(nm[1], block_size // nm[1] * nm[1])   # an N:M group must sit inside one lazy block
    dead = torch.diag(H) == 0                   # never-seen inputs: weight is free, so prune it first
    H[dead, dead] = 1
    W[:, dead] = 0
    U, _ = inverse_cholesky(H, dampening_frac, 5)
    if U is None:
        return None
    for i1 in range(0, IC, block_size):
        i2 = min(i1 + block_size, IC)
        W1 = W[:, i1:i2].clone()                                # [OC, B]
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)                                      # [B]
        Err1 = torch.zeros_like(W1)
        if nm:
            prune = torch.zeros_like(W1, dtype=torch.bool)
        else:                                                   # lowest fraction of the whole block
            score = W1**2 / d[None, :] ** 2
            k = int(score.numel() * float(sparsity))
            prune = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                prune.view(-1)[score.view(-1).topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            if nm and i % nm[1] == 0:                           # choose the group's mask on error-corrected W
                score = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                prune[:, i:i + nm[1]].scatter_(1, score.topk(nm[1] - nm[0], dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                       # the block's error reaches later columns at once
    return W


@register("prune")
class Prune(Method):
    Config = PruneConfig
    effect = "prune"

    @property
    def needs(self):
        return () if self.config.criterion == "magnitude" else ("hessian",)

    def check_shape(self, shape):
        nm = _nm(self.config.sparsity)
        if nm and shape[1] % nm[1]:
            return "sparsity", f"{nm[1]} does not divide in_features {shape[1]}"
        return None

    def apply(self, name, W, stats) -> Replaced:
        cfg = self.config
        info = {"sparsity": cfg.sparsity, "criterion": cfg.criterion}
        W_hat = None
        if cfg.criterion == "sparsegpt":
            W_hat = sparsegpt_prune(W, stats["hessian"], cfg.sparsity, cfg.block_size, cfg.dampening_frac)
            if W_hat is None:        # as GPTQ: never abort a run on one layer's numerics
                info["fallback"] = "wanda (no Cholesky factor of the Hessian even after raising the damping)"
        if W_hat is None:
            score = W.abs()
            if cfg.criterion != "magnitude":
                score = score * torch.diag(stats["hessian"]).clamp_min(0).sqrt()[None, :]
            W_hat = W * prune_mask(score, cfg.sparsity)
        info["zeros"] = float((W_hat == 0).float().mean())
        return Replaced(name, "prune", W_hat, info=info)
