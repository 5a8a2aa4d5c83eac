"""Magnitude / Wanda pruning: N:M semi-structured or unstructured, so that compensation of sparsity can be shown.

Scores are |W| (magnitude) or |W|·‖x_j‖ (Wanda, Sun et al. 2023; ‖x_j‖² ∝ diag(H)). N:M keeps the N highest
scores in every M consecutive input columns of a row; a fraction p removes the p·IC lowest of each row.
The pruned weight is stored dense (zeros included).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import field_validator

from calq.methods.base import Replaced
from calq.methods.registry import Method, StageConfig, register


class PruneConfig(StageConfig):
    sparsity: str = "2:4"           # "N:M", or a fraction such as "0.5"
    criterion: Literal["magnitude", "wanda"] = "magnitude"

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


def prune_mask(score: torch.Tensor, sparsity: str) -> torch.Tensor:
    """Boolean keep-mask [OC, IC] from scores [OC, IC]."""
    OC, IC = score.shape
    m = re.fullmatch(r"(\d+):(\d+)", sparsity)
    if m:
        n, M = int(m[1]), int(m[2])
        g = score.reshape(OC, IC // M, M)                            # [OC, IC/M, M]
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep.scatter_(2, g.topk(n, dim=2).indices, True)
        return keep.reshape(OC, IC)
    k = int(round(float(sparsity) * IC))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


@register("prune")
class Prune(Method):
    Config = PruneConfig
    needs = ("hessian",)

    def check_shape(self, shape):
        m = re.fullmatch(r"(\d+):(\d+)", self.config.sparsity)
        if m and shape[1] % int(m[2]):
            return "sparsity", f"{m[2]} does not divide in_features {shape[1]}"
        return None

    def apply(self, name, W, stats) -> Replaced:
        score = W.abs()
        if self.config.criterion == "wanda":
            score = score * torch.diag(stats["hessian"]).clamp_min(0).sqrt()[None, :]
        keep = prune_mask(score, self.config.sparsity)
        return Replaced(name, "prune", W * keep, info={"sparsity": self.config.sparsity,
                                                       "zeros": float(1 - keep.float().mean())})
