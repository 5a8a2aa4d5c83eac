"""Orthonormal Hadamard transforms of any width n = K·2^k, applied in O(n log n) on CPU.

H_n = (H_K ⊗ H_{2^k}) / √n (shared/methods/hadamard.md): H_{2^k} is Sylvester's, H_K a small ±1 matrix built
without tables by Paley's constructions (I: q ≡ 3 mod 4 → order q+1; II: q ≡ 1 mod 4 → order 2(q+1)) or as
H_2 ⊗ H_{K/2}. These are not the ±1 tables of fast-hadamard-transform's 12N/40N kernels, so fake quantization
matches Quamba's math but not its CUDA kernels bit for bit; the construction is recorded in the checkpoint.
`x ↦ x·Hᵀ` on the last dim: fuse into an input side with `W ← W·Hᵀ` (rotate_input), an output side with
`W ← H·W` (rotate_output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), the quadratic character mod prime q (χ(0) = 0). [q, q]"""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return torch.eye(q + 1, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@cache
def small_hadamard(K: int) -> tuple[torch.Tensor, str] | None:
    """(±1 matrix [K, K] with H Hᵀ = K·I, construction id), or None if no construction here gives order K."""
    if K == 1:
        return torch.ones(1, 1, dtype=torch.float64), "1"
    if K == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), "sylvester:2"
    if K % 4:
        return None             # Hadamard orders above 2 are multiples of 4
    if _is_prime(K - 1) and (K - 1) % 4 == 3:
        return _paley1(K - 1), f"paley1:q={K - 1}"
    if _is_prime(K // 2 - 1) and (K // 2 - 1) % 4 == 1:
        return _paley2(K // 2 - 1), f"paley2:q={K // 2 - 1}"
    half = small_hadamard(K // 2)
    if half is not None:
        H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(H2, half[0]), f"2x({half[1]})"
    return None


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester Walsh–Hadamard transform on the last dim (a power of 2)."""
    n, lead, h = x.shape[-1], x.shape[:-1], 1
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)                          # [..., pairs, 2, h]
        x = torch.stack((x[..., 0, :] + x[..., 1, :], x[..., 0, :] - x[..., 1, :]), -2).reshape(*lead, n)
        h *= 2
    return x


@dataclass(frozen=True)
class Hadamard:
    """H_n = (H_K ⊗ H_m)/√n with m = n/K a power of 2."""

    n: int
    K: int
    source: str             # construction id of H_K, e.g. "paley1:q=11"

    @property
    def m(self) -> int:
        return self.n // self.K

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x·Hᵀ on the last dim, in x's dtype (call it on fp32/fp64 tensors)."""
        assert x.shape[-1] == self.n, (x.shape, self.n)
        y = fwht(x.reshape(*x.shape[:-1], self.K, self.m))                # [..., K, m]
        if self.K > 1:
            HK = small_hadamard(self.K)[0].to(y.dtype)
            y = torch.einsum("ab,...bm->...am", HK, y)
        return y.reshape(x.shape) / math.sqrt(self.n)

    def matrix(self) -> torch.Tensor:
        """Dense H [n, n] in fp64 (tests and small fusions)."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).T

    def rotate_input(self, W: torch.Tensor) -> torch.Tensor:
        """W·Hᵀ for W [OC, n]: the Linear then expects inputs rotated by x·Hᵀ. Computed in fp64."""
        return self.apply(W.double()).to(W.dtype)

    def rotate_output(self, W: torch.Tensor) -> torch.Tensor:
        """H·W for W [n, IC]: the Linear's outputs come out rotated by y·Hᵀ. Computed in fp64."""
        return self.apply(W.double().T).T.to(W.dtype)

    def meta(self) -> dict:
        return {"n": self.n, "K": self.K, "m": self.m, "source": self.source, "normalised": True, "signs": None}


def hadamard(n: int) -> Hadamard:
    """The H_n with the smallest constructible K = n/2^j; ValueError naming n if none exists."""
    v = (n & -n).bit_length() - 1                   # 2-adic valuation of n
    odd = n >> v
    for j in range(v + 1):
        K = odd << j
        found = small_hadamard(K)
        if found is not None:
            return Hadamard(n, K, found[1])
    raise ValueError(f"no Hadamard construction of order {n} = {odd}·2^{v}: no Paley/Sylvester H_K for "
                     f"K = {odd}·2^j (orders like 52, 156, 172 need published tables)")
