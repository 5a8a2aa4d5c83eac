"""Pruning without a model: N:M and unstructured masks, Wanda's scores, and SparseGPT's solve (exact at H = I,
far below magnitude and Wanda on correlated inputs, exact N:M pattern, dead inputs)."""

import pytest
import torch

from calq.methods.gptq import accumulate_hessian
from calq.methods.prune import Prune, PruneConfig, prune_mask, sparsegpt_prune

SPARSEGPT_MARGIN = 0.6   # SparseGPT's output error must be below this fraction of Wanda's (seen: 0.13-0.2)

OC, IC, N = 32, 128, 2048


def _correlated(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 16, generator=gen) @ torch.randn(16, IC, generator=gen) + 0.1 * torch.randn(N, IC, generator=gen)
    X = X * torch.rand(IC, generator=gen) * 2
    return torch.randn(OC, IC, generator=gen), accumulate_hessian(None, X, 0)[0]


def _out_err(W, W_hat, H):
    dW = W - W_hat
    return float(((dW @ H) * dW).sum())


@pytest.mark.parametrize("nm", ["2:4", "1:4", "3:8"])
def test_nm_mask_keeps_the_n_largest_of_every_m(nm):
    n, m = map(int, nm.split(":"))
    score = torch.randn(OC, IC, generator=torch.Generator().manual_seed(1)).abs()
    keep = prune_mask(score, nm).reshape(OC, IC // m, m)
    assert (keep.sum(-1) == n).all()
    s = score.reshape(OC, IC // m, m)
    kept_min = torch.where(keep, s, torch.inf).amin(-1)
    dropped_max = torch.where(keep, -torch.inf, s).amax(-1)
    assert (kept_min > dropped_max).all()


def test_unstructured_mask_removes_the_fraction_of_each_row():
    score = torch.randn(OC, IC, generator=torch.Generator().manual_seed(2)).abs()
    keep = prune_mask(score, "0.3")
    assert (keep.sum(1) == IC - round(0.3 * IC)).all()


def test_sparsegpt_at_identity_hessian_is_magnitude_pruning():
    # H = I: the inverse Hessian is diagonal, so no error reaches other columns and w²/d² orders like |w|
    W = torch.randn(OC, IC, generator=torch.Generator().manual_seed(3))
    for sparsity in ("2:4", "0.5"):
        got = sparsegpt_prune(W, torch.eye(IC), sparsity)
        if ":" in sparsity:
            assert torch.equal(got, W * prune_mask(W.abs(), sparsity))
        else:                     # one threshold over the block (the reference's choice), not per row
            assert (got == 0).sum() == int(0.5 * OC * IC)
            assert torch.equal(got[got != 0], W[got != 0])
            assert W[got == 0].abs().max() <= W[got != 0].abs().min()


@pytest.mark.parametrize("sparsity", ["2:4", "0.5"])
def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs(sparsity):
    W, H = _correlated()
    mag = W * prune_mask(W.abs(), sparsity)
    wanda = W * prune_mask(W.abs() * torch.diag(H).sqrt()[None, :], sparsity)
    sgpt = sparsegpt_prune(W, H, sparsity)
    assert _out_err(W, wanda, H) < _out_err(W, mag, H)
    assert _out_err(W, sgpt, H) < SPARSEGPT_MARGIN * _out_err(W, wanda, H)
    if sparsity == "2:4":
        assert ((sgpt.reshape(OC, -1, 4) == 0).sum(-1) >= 2).all()
        assert (sgpt == 0).float().mean() == pytest.approx(0.5, abs=1e-3)   # only exact-zero updates add more
    else:
        assert (sgpt == 0).float().mean() == pytest.approx(0.5, abs=1e-3)


def test_sparsegpt_block_size_only_changes_the_unstructured_mask_granularity():
    # N:M: lazy batching is exact math, so the block size changes nothing but fp32 rounding
    W, H = _correlated(4)
    a, b = sparsegpt_prune(W, H, "2:4", block_size=128), sparsegpt_prune(W, H, "2:4", block_size=16)
    assert torch.equal(a == 0, b == 0)
    assert torch.allclose(a, b, atol=1e-4)


def test_sparsegpt_prunes_dead_inputs_first():
    W, H = _correlated(5)
    dead = torch.zeros(IC, dtype=torch.bool)
    dead[::4] = True                                      # one never-seen input in every group of 4
    H[dead, :] = 0
    H[:, dead] = 0
    got = sparsegpt_prune(W, H, "2:4")
    assert (got[:, dead] == 0).all() and torch.isfinite(got).all()


def test_stage_checks_that_m_divides_the_layer():
    assert Prune(PruneConfig(method="prune", sparsity="2:4")).check_shape((8, 130))[0] == "sparsity"
    assert Prune(PruneConfig(method="prune", sparsity="2:4")).check_shape((8, 128)) is None
    with pytest.raises(ValueError, match="N:M"):
        PruneConfig(method="prune", sparsity="4:2")


def test_sparsegpt_falls_back_to_wanda_when_the_hessian_has_no_factor():
    W, _ = _correlated(6)
    H = -torch.eye(IC)                                    # no damping makes this positive definite
    assert sparsegpt_prune(W, H, "2:4") is None
    rec = Prune(PruneConfig(method="prune", criterion="sparsegpt")).apply("m", W, {"hessian": H})
    assert "wanda" in rec.info["fallback"]
    assert ((rec.W_new.reshape(OC, -1, 4) == 0).sum(-1) == 2).all()
