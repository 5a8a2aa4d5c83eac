"""Mamba2's SSD scan in chunked matrix form (fp32) and the grouped gated RMSNorm.

SSD (Dao & Gu 2024, "Transformers are SSMs", §6): per head, h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_tᵀ and
y_t = C_t h_t + D x_t. Inside a chunk of Q tokens the map is a masked "attention" C_l B_sᵀ exp(cA_l − cA_s)
(cA = cumulative Δ A, every exponent ≤ 0, so nothing overflows); across chunks only the states recur.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_scan(x, dt, A, B, C, D=None, chunk: int = 64):
    """x [b, L, h, p]; dt [b, L, h] (after bias, softplus and clamp); A [h]; B, C [b, L, g, n]; D [h].

    Returns y [b, L, h, p] in fp32. Heads h are split into g contiguous groups sharing B and C.
    """
    b, L, h, p = x.shape
    g = B.shape[2]
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    B = B.repeat_interleave(h // g, dim=2)                       # [b, L, h, n]
    C = C.repeat_interleave(h // g, dim=2)
    pad = (-L) % chunk
    xdt = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))         # [b, L', h, p]
    dA = F.pad(dt * A, (0, 0, 0, pad))                           # [b, L', h]
    B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = xdt.shape[1] // chunk
    xdt, B, C = (t.reshape(b, c, chunk, h, -1) for t in (xdt, B, C))   # [b, c, Q, h, ·]
    cA = dA.reshape(b, c, chunk, h).cumsum(2)                    # [b, c, Q, h]
    seg = cA[:, :, :, None, :] - cA[:, :, None, :, :]            # [b, c, Q(l), Q(s), h]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    # 1. within a chunk
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B) * decay    # [b, c, Q, Q, h]
    y = torch.einsum("bclsh,bcshp->bclhp", scores, xdt)
    # 2. each chunk's contribution to the state at its end, then 3. the recurrence over chunk boundaries
    to_end = torch.exp(cA[:, :, -1:, :] - cA)                    # [b, c, Q, h]
    chunk_states = torch.einsum("bclhn,bclh,bclhp->bchpn", B, to_end, xdt)
    state = x.new_zeros(b, h, p, B.shape[-1])
    starts = []
    for i in range(c):
        starts.append(state)
        state = torch.exp(cA[:, i, -1])[:, :, None, None] * state + chunk_states[:, i]
    starts = torch.stack(starts, 1)                              # [b, c, h, p, n]: state entering chunk
    # 4. the entering state read out at each position
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", C, starts, torch.exp(cA))
    y = y.reshape(b, c * chunk, h, p)[:, :L]
    if D is not None:
        y = y + x * D.float()[:, None]
    return y


def gated_rmsnorm(y, z, weight, n_groups: int, eps: float):
    """mamba_ssm's RMSNormGated (norm_before_gate=False): v = y·silu(z), normalised over each of n_groups
    contiguous groups of the last dim (not over all of it), times weight. fp32 in, fp32 out. [..., E]"""
    v = y.float() * F.silu(z.float())
    vg = v.reshape(*v.shape[:-1], n_groups, -1)                  # [..., G, E/G]
    vg = vg * torch.rsqrt(vg.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * vg.reshape(v.shape)
