"""Static activation scales for Quamba: min-max, percentile EMA, and per-channel statistics.

Quantizer convention (quamba.md): symmetric, s = absmax / (2^(b-1) − 1), q = clamp(round(v/s), −2^(b-1),
2^(b-1) − 1), v̂ = q·s, round half to even (torch.round). Observers see one calibration batch at a time and,
where the spec says "per sample", walk its rows in order: the percentile EMA depends on the document order.
"""

from __future__ import annotations

import torch
from torch import nn

from calq.methods.gptq import accumulate_hessian


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def fake_quant(v: torch.Tensor, scale: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """v̂ = clamp(round(v/s), −2^(b-1), 2^(b-1)−1)·s; scale broadcasts against v's last dims."""
    return torch.clamp(torch.round(v / scale), -qmax(bits) - 1, qmax(bits)) * scale


def quantile(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """torch.quantile's linear interpolation over all of v, without its 2^24-element limit."""
    v = v.flatten().float()
    pos = alpha * (v.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, v.numel() - 1)
    a = v.kthvalue(lo + 1).values
    b = v.kthvalue(hi + 1).values if hi != lo else a
    return a + (pos - lo) * (b - a)


class MinMax:
    """Running max of |v| over everything seen → one per-tensor scale."""

    def __init__(self):
        self.m: torch.Tensor | None = None

    def observe(self, v: torch.Tensor) -> None:
        a = v.detach().abs().amax().float()
        self.m = a if self.m is None else torch.maximum(self.m, a)

    def absmax(self) -> torch.Tensor:
        return self.m


class PercentileEMA:
    """Quamba's clipping of the scan input u: per sample p = quantile(|v|, α); m ← p (first), then
    m ← m + σ·(p − m) with σ = 0.01 (the reference observer's momentum). Rows of a batch are samples."""

    def __init__(self, alpha: float, momentum: float = 0.01):
        self.alpha, self.momentum = alpha, momentum
        self.m: torch.Tensor | None = None

    def observe(self, v: torch.Tensor) -> None:
        for row in v.detach():                      # [B, L, E] → one sample at a time, in order
            p = quantile(row.abs(), self.alpha)
            self.m = p if self.m is None else self.m + self.momentum * (p - self.m)

    def absmax(self) -> torch.Tensor:
        return self.m


class ChannelStats:
    """Per last-dim channel: running max of |v| (group scales) and, per sample, mean_t |v| reduced by an
    element-wise max over samples (Quamba2's reorder statistic)."""

    def __init__(self):
        self.amax: torch.Tensor | None = None
        self.mean_abs: torch.Tensor | None = None

    def observe(self, v: torch.Tensor) -> None:
        a = v.detach().abs().float()                            # [B, L, C]
        amax = a.flatten(0, -2).amax(0)                         # [C]
        mean = a.mean(-2).reshape(-1, a.shape[-1]).amax(0)      # per sample mean over tokens, max over samples
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.mean_abs = mean if self.mean_abs is None else torch.maximum(self.mean_abs, mean)

    def absmax(self) -> torch.Tensor:
        return self.amax.amax()


def scale_from(absmax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """s = absmax / (2^(b-1) − 1) in fp32; an all-zero site gets s = 1 (any value codes 0 as 0)."""
    s = absmax.float() / qmax(bits)
    return torch.where(s > 0, s, torch.ones_like(s))


class QuantPoints(nn.Module):
    """What the simulated mixers share: a site observes (calibrate), fake-quantizes (quant) or passes (fp);
    in calibrate mode, the inputs of Linears that GPTQ will quantize to 4 bits are folded into a Hessian."""

    def _act(self, site: str, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            self.observers[site].observe(v)
            return v
        if self.mode == "quant" and self.plan.quant_acts:
            return fake_quant(v, getattr(self, f"s_{site}"))
        return v

    def _hessian(self, name: str, X: torch.Tensor) -> None:
        if self.mode == "calibrate" and self.plan.w_bits == 4 and self.plan.gptq:
            H, n = self.hessians.get(name, (None, 0))
            self.hessians[name] = accumulate_hessian(H, X.reshape(-1, X.shape[-1]), n)
