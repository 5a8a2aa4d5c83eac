"""CorDA: context-oriented decomposition for adapter initialisation (shared/methods/corda.md).

SVD of W·C_f, with C the per-sample-normalised input second moment of the calibration ("context") data and
C_f = C + damp·mean(diag C)·I (damp from 0.01, doubled until ‖C_f C_f⁻¹ − I‖_F < 0.05), mapped back with
C_f⁻¹ so that W = U·diag(S)·(Vᵀ C_f⁻¹) exactly. The adapter takes r components: the largest for `ipa`
(instruction-previewed: the task's dominant directions become trainable), the smallest for `kpa`
(knowledge-preserved: what the context drives stays frozen). The base becomes the residual W − B·A, so the
model's output is unchanged at initialisation; a later quantization stage compresses that residual.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from calq.methods.base import Adapter
from calq.methods.registry import Method, StageConfig, register

INV_TOL = 0.05   # PEFT's and the reference code's acceptance of the damped inverse


def damped_inverse(C: torch.Tensor, max_tries: int = 30) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(C_f, C_f⁻¹, damp) in fp32."""
    C = C.float()
    eye = torch.eye(C.shape[0], device=C.device)
    damp = 0.01
    for _ in range(max_tries):
        C_f = C + damp * torch.diag(C).mean() * eye
        C_inv = torch.linalg.inv(C_f)
        if torch.dist(C_f @ C_inv, eye).item() < INV_TOL:
            return C_f, C_inv, damp
        damp *= 2
    raise ValueError(f"the covariance stayed singular after damping to {damp:g}; calibrate on more tokens")


def corda_decompose(W: torch.Tensor, C: torch.Tensor, rank: int, mode: str = "ipa"):
    """(B [OC, r], A [r, IC], W_res, S_r [r] the adapter's singular values of W·C_f, damp).

    W_res + B·A == W up to fp32 rounding."""
    W = W.float()
    C_f, C_inv, damp = damped_inverse(C)
    U, S, Vh = torch.linalg.svd(W @ C_f, full_matrices=False)     # [OC, k], [k], [k, IC]
    V_hat = (Vh @ C_inv).t()                                      # [IC, k]; columns not orthonormal
    k = S.shape[0]
    r = min(rank, k)
    idx = slice(0, r) if mode == "ipa" else slice(k - r, k)
    root = S[idx].sqrt()                                          # scaling = alpha / r = 1
    A = root[:, None] * V_hat[:, idx].t()                         # [r, IC]
    B = U[:, idx] * root[None, :]                                 # [OC, r]
    return B, A, W - B @ A, S[idx], damp


class CorDAConfig(StageConfig):
    rank: int = Field(16, ge=1)
    mode: Literal["ipa", "kpa"] = "ipa"


@register("corda")
class CorDA(Method):
    """The calibration dataset is CorDA's context: task samples for ipa, knowledge to keep for kpa."""

    Config = CorDAConfig
    effect = "adapter+base"
    needs = ("sample_covariance",)
    adapters = True

    def apply(self, name, W, stats) -> Adapter:
        cfg = self.config
        B, A, W_res, S, damp = corda_decompose(W, stats["sample_covariance"], cfg.rank, cfg.mode)
        return Adapter(name, "corda", A, B, W_base=W_res,
                       info={"mode": cfg.mode, "rank": A.shape[0], "damp": damp,
                             "singular_values": [S[0].item(), S[-1].item()]})
