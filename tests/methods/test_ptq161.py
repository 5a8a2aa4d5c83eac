"""PTQ1.61 pieces: the mask, packing, exact dequantization, the bit accounting and the loss."""

from __future__ import annotations

import math

import pytest
import torch

from calq.methods.ptq161 import (
    _Binarized,
    block_loss,
    dequantize,
    pack_bits,
    row_quant,
    salient_mask,
    unpack_bits,
)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 819])
def test_bits_round_trip(n):
    b = torch.rand(5, n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(b)
    assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(n / 8))
    assert torch.equal(unpack_bits(packed, n), b)


def test_mask_takes_floor_ratio_plus_one_channels_and_ties():
    a = torch.randperm(100).float()
    m = salient_mask(a, 0.2)
    assert int(m.sum()) == 21 and bool(m[a.argmax()]) and not bool(m[a.argmin()])
    a[a < 79] = 79.0            # every channel below the threshold ties with it
    assert bool(salient_mask(a, 0.2).all())


def test_row_quant_range_includes_zero_and_flat_rows():
    W = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-2.0, -1.0, -0.5]])
    q, s, z = row_quant(W, 4)
    D = s[:, None] * (q - z[:, None])
    assert q.min() >= 0 and q.max() <= 15
    assert z[0] == 0 and z[2] == 15                      # all-positive row: lo = 0; all-negative: hi = 0
    assert torch.equal(D[1], torch.zeros(3))             # an all-zero row uses [-1, 1] and stays zero
    assert (D - W).abs().max() <= s.max() / 2 + 1e-6


def _part(OC=48, IC=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OC, IC, generator=g)
    return W, _Binarized(W, salient_mask(torch.rand(IC, generator=g), 0.2), 4)


def test_dequantized_weights_equal_the_trained_fake_quant_weights_exactly():
    W, part = _part()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():    # "trained" values that fp16 holds exactly (r1 a power of two: r1·alpha is exact)
        part.alpha.copy_((part.alpha * (1 + 0.1 * torch.rand(part.alpha.shape, generator=g))).half().float())
        part.r1.copy_(2.0 ** torch.randint(-1, 2, part.r1.shape, generator=g).float())
        part.r2.copy_((1 + 0.2 * torch.randn(part.r2.shape, generator=g)).half().float())
        part.mu.copy_(part.mu.half().float())
    tensors, W_hat = part.pack()
    assert torch.equal(W_hat, part.weight().detach())
    assert torch.equal(dequantize(tensors, tuple(W.shape), 4), W_hat)
    assert {t.dtype for k, t in tensors.items() if k in ("scale", "alpha", "mu", "r2")} == {torch.float16}


def test_binarized_part_is_alpha_sign_plus_mu_and_salient_part_4bit():
    W, part = _part()
    W_hat = part.weight().detach()
    ns = ~part.mask
    dev = (W_hat[:, ns] - part.mu).abs()
    assert torch.allclose(dev, part.alpha.detach().expand_as(dev))      # two levels per row: mu ± alpha
    assert torch.equal(torch.sign(W_hat[:, ns] - part.mu), torch.where(W[:, ns] >= part.mu, 1.0, -1.0))
    levels = {len(torch.unique(r)) for r in W_hat[:, part.mask]}
    assert max(levels) <= 16


def test_bits_per_weight_of_a_square_4096_layer():
    """Spec App. A: 1.6 (signs + 4-bit codes) + mask + per-row/column fp16 scales ≈ 1.617 bits per weight."""
    OC = IC = 4096
    W = torch.randn(OC, IC, generator=torch.Generator().manual_seed(0))
    part = _Binarized(W, salient_mask(torch.arange(IC).float(), 0.2), 4)
    tensors, _ = part.pack()
    n_sal = int(part.mask.sum())
    assert n_sal == 820
    expect = {"mask": IC // 8, "signs": OC * math.ceil((IC - n_sal) / 8), "codes": OC * math.ceil(n_sal / 8) * 4,
              "zero": OC // 8 * 4, "scale": 2 * OC, "alpha": 2 * OC, "mu": 2 * OC, "r2": 2 * (IC - n_sal)}
    assert {k: v.nbytes for k, v in tensors.items()} == expect
    bits = 8 * sum(expect.values()) / (OC * IC)
    # the paper's count, plus each row's padding: signs to whole bytes, 4-bit codes to whole int32 words
    paper = ((IC - n_sal) + 4 * n_sal + 3 * 16 + 4) / IC + (16 * (IC - n_sal) + IC) / (OC * IC)
    padding = (8 * math.ceil((IC - n_sal) / 8) - (IC - n_sal) + 32 * math.ceil(n_sal / 8) - 4 * n_sal) / IC
    assert abs(paper - 1.617) < 0.001 and bits == pytest.approx(paper + padding, abs=1e-9), (bits, paper)


def test_loss_is_zero_only_at_the_targets():
    y = torch.randn(2, 8, 16)
    assert abs(float(block_loss(y, y, y))) < 1e-6
    assert float(block_loss(y + 0.1 * torch.randn_like(y), y, y)) > 1e-3
