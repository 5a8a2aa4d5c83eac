"""EoRA: eigenspace low-rank compensation of a compressed Linear (shared/methods/eora.md).

Given the original W and the compressed Ŵ (both [OC, IC]) and the input second moment C ∝ XᵀX, find the
rank-r B [OC, r], A [r, IC] minimising ‖(ΔW − BA) Xᵀ‖_F with ΔW = W − Ŵ: rotate ΔW into C's eigenbasis scaled
by √λ, truncate its SVD there, and rotate back. Baselines in the same stage:
  svd    S = I: plain SVD of ΔW (ZeroQuant-V2's LoRC), spends rank on weight error
  act-s  S = diag(mean |x_j|): activation-scaled SVD (the paper's ACT-S)
  corda  S = C_f (damped C, CorDA's weighting; corda.md "Compensating an already-compressed Ŵ"): close to,
         not at, the optimum, since C over-weights high-variance directions
Eigenvalues at or below λ_max · IC · eps_fp64 (numerical zero of the fp64 eigh) are dropped, both √λ and 1/√λ
set to 0. GPTQModel's cutoff, λ_max · min(1, IC · eps_fp32), which eora.md first adopted, is relative to the
largest mode: on a layer with massive activations (SmolLM2's layer 11 down_proj, one channel with 10⁵× the
variance of the rest) it keeps one mode and a rank-16 EoRA becomes rank 1 (docs/real-model.md). Small kept modes
amplify nothing as long as the products run in fp64: BA = U_r U_rᵀ ΔW P, P the projection onto the kept modes,
so ‖BA‖₂ ≤ ‖ΔW‖₂. eigh, the weighted ΔW, its SVD and the way back in fp64; ΔW itself from fp32 weights.
The layer is then y = x Ŵᵀ + (x Aᵀ) Bᵀ; as a PEFT LoRA adapter lora_alpha = r (scaling 1).
"""

from __future__ import annotations

import torch

BASES = ("eora", "svd", "act-s", "corda")


def eigen_sqrt(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [IC, k], S⁺ [k, IC]) with S = Q·diag(√λ), S⁺ = diag(1/√λ)·Qᵀ over the k kept eigenmodes of C; fp64."""
    if not torch.isfinite(C).all():
        raise ValueError("the input covariance has non-finite entries")
    lam, Q = torch.linalg.eigh(C.double())                        # ascending λ
    keep = lam > lam.max().clamp_min(0) * C.shape[0] * torch.finfo(torch.float64).eps
    lam, Q = lam[keep], Q[:, keep]
    return Q * lam.sqrt()[None, :], Q.t() / lam.sqrt()[:, None]


def low_rank_compensation(W: torch.Tensor, W_hat: torch.Tensor, rank: int, basis: str = "eora",
                          C: torch.Tensor | None = None, absmean: torch.Tensor | None = None):
    """(B [OC, r], A [r, IC], sigma) for ΔW = W − Ŵ. r is clamped to min(OC, IC); sigma: all singular values
    of the weighted ΔW, so the residual error of any rank can be read off (Eckart–Young)."""
    dW = W.float() - W_hat.float()                                 # [OC, IC]; the difference in fp32
    if basis == "eora":
        dW = dW.double()                                           # kept modes span many decades (eigen_sqrt)
    OC, IC = dW.shape
    r = min(rank, OC, IC)
    if basis == "eora":
        S, S_inv = eigen_sqrt(C)
    elif basis == "act-s":
        a = absmean.float().clamp_min(torch.finfo(torch.float32).tiny)
        S, S_inv = torch.diag(a), torch.diag(1 / a)
    elif basis == "svd":
        S = S_inv = None
    elif basis == "corda":
        from calq.methods.corda import damped_inverse

        S, S_inv, _ = damped_inverse(C)
    else:
        raise ValueError(f"unknown basis {basis!r}; use one of {BASES}")
    dW_s = dW if S is None else dW @ S                             # [OC, k] in the weighted space
    U, sigma, Vh = torch.linalg.svd(dW_s, full_matrices=False)
    k = sigma.shape[0]                                             # < r when C excites fewer than r modes
    root = sigma[:r].sqrt()                                        # √Σ split evenly between B and A
    B = torch.zeros(OC, r)
    A = torch.zeros(r, IC)
    B[:, :k] = (U[:, :r] * root[None, :]).float()                  # [OC, r]; zero columns past k
    A[:k] = (root[:, None] * (Vh[:r] if S_inv is None else Vh[:r] @ S_inv)).float()  # [r, IC]
    return B, A, sigma.float()


# --- the recipe stage -------------------------------------------------------------------------------------

import re  # noqa: E402
from typing import Literal  # noqa: E402

from pydantic import Field, PositiveInt, field_validator  # noqa: E402

from calq.methods.base import Adapter  # noqa: E402
from calq.methods.gptq import gptq_quantize  # noqa: E402
from calq.methods.quantizer import QuantArgs, quantize_rtn  # noqa: E402
from calq.methods.registry import Method, StageConfig, check_regex, register  # noqa: E402


class EoRAConfig(StageConfig):
    rank: int = Field(16, ge=1)
    rank_pattern: dict[str, PositiveInt] = Field(default_factory=dict)  # regex (re.match on the module path) -> rank
    basis: Literal["eora", "svd", "act-s", "corda"] = "eora"
    # Round A and B to this many bits (RTN, symmetric, one scale per row), as the paper's --lowrank_wbits.
    # PEFT has no integer LoRA format: they are stored dequantized; the report gives their packed size too.
    adapter_bits: int | None = Field(None, ge=2, le=8)
    # How A and B are rounded: rtn, or gptq as the official --lowrank_wbits (A against the input Hessian H,
    # then B against the Hessian of its own input Â x, i.e. Â H Âᵀ).
    adapter_quant: Literal["rtn", "gptq"] = "rtn"

    @field_validator("rank_pattern")
    @classmethod
    def _patterns_compile(cls, v):
        for pattern in v:
            check_regex(pattern)
        return v


@register("eora")
class EoRA(Method):
    """Compensates the compression done by the stages before it, Linear by Linear, block by block."""

    Config = EoRAConfig
    effect = "adapter"
    needs = ("hessian", "original_weight", "input_absmean")
    compensates = True
    adapters = True
    calibrate_on = "original"
    robust_statistics = True

    def apply(self, name, W_hat, stats) -> Adapter:
        cfg = self.config
        rank = next((r for pat, r in cfg.rank_pattern.items() if re.match(pat, name)), cfg.rank)
        B, A, sigma = low_rank_compensation(stats["original_weight"], W_hat, rank, cfg.basis, stats["hessian"],
                                            stats["input_absmean"])
        info = {"basis": cfg.basis, "rank": A.shape[0], "requested_rank": rank}
        if cfg.adapter_bits:
            args = QuantArgs(bits=cfg.adapter_bits, group_size=-1, scale_dtype=stats["scale_dtype"])
            if cfg.adapter_quant == "gptq":
                H = stats["hessian"].float()
                A = gptq_quantize(A, H, args).W_hat
                B = gptq_quantize(B, A @ H @ A.t(), args).W_hat
            else:
                A, B = quantize_rtn(A, args)[3], quantize_rtn(B, args)[3]
            info["adapter_quant"] = cfg.adapter_quant
            # codes + one fp16 scale per row of A [r, IC] and of B [OC, r]
            info["packed_bytes"] = (A.numel() + B.numel()) * cfg.adapter_bits // 8 + 2 * (A.shape[0] + B.shape[0])
            info["adapter_bits"] = cfg.adapter_bits
        return Adapter(name, "eora", A, B, info=info)
