"""A chunked selective scan for training the zoo Mamba1 model on CPU.

transformers' reference scan steps through time one token at a time; with autograd on a CPU that trains at
a few hundred tokens/s. Here each chunk of L tokens is solved in closed form,
    h_t = exp(cA_t) * (h_0 + sum_{s<=t} exp(-cA_s) * dt_s B_s u_s),   cA_t = sum_{k<=t} dt_k A,
and only the chunk boundaries are sequential. exp(-cA_s) grows inside a chunk, so each step's decay is
floored at exp(-80/L) (e^-10 for L=8): a state already decayed below 5e-5 in one step is treated as
decayed by exactly that. Used for training only; evaluation runs transformers' own scan.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CHUNK = 8


def chunked_selective_scan(u, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk: int = CHUNK, **_):
    """Same contract as transformers' `mamba_selective_scan`: u, dt [b, d, T]; A [d, n]; B, C [b, n, T]."""
    dtype = u.dtype
    u, dt, A, B, C = u.float(), dt.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    b, d, T = u.shape
    n = A.shape[-1]
    dt_t = dt.transpose(1, 2)                        # [b, T, d]
    dtu_t = (dt * u).transpose(1, 2)                 # [b, T, d]
    B_t, C_t = B.transpose(1, 2), C.transpose(1, 2)  # [b, T, n]
    h = u.new_zeros(b, d, n)
    ys = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        cA = (dt_t[:, s:e, :, None] * A).clamp(min=-80.0 / chunk).cumsum(1)    # [b, L, d, n]
        dBu = dtu_t[:, s:e, :, None] * B_t[:, s:e, None, :]                     # [b, L, d, n]
        hc = torch.exp(cA) * (h[:, None] + (torch.exp(-cA) * dBu).cumsum(1))    # [b, L, d, n]
        ys.append(torch.einsum("bldn,bln->bld", hc, C_t[:, s:e]))
        h = hc[:, -1]
    y = torch.cat(ys, 1).transpose(1, 2)             # [b, d, T]
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h) if return_last_state else y


@contextlib.contextmanager
def use_chunked_scan():
    """Route transformers' Mamba1 mixer through the chunked scan inside the block."""
    from transformers.models.mamba import modeling_mamba

    original = modeling_mamba.mamba_selective_scan
    modeling_mamba.mamba_selective_scan = chunked_selective_scan
    try:
        yield
    finally:
        modeling_mamba.mamba_selective_scan = original
