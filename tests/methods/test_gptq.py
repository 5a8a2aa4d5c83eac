"""GPTQ math without a model: Hessian accumulation, RTN equivalence at H = I, quality on a correlated H,
the exact checkpoint convention, the paper's loss identity, dead columns, static groups and the RTN fallback."""

import math

import pytest
import torch

from calq.methods.gptq import accumulate_hessian, gptq_quantize
from calq.methods.quantizer import QuantArgs, dequantize, quantize_rtn

HESSIAN_RTOL = 1e-5     # fp32 running mean vs one fp32 matmul over all tokens
LOSS_RTOL = 1e-4        # fp32 error propagation over 128 columns vs an fp64 quadratic form (seen: 4e-6)
GPTQ_MARGIN = 0.5       # GPTQ output error must be at most this fraction of RTN's (seen: <= 0.1)
BLOCK_FLIP_FRAC = 0.01  # lazy batching is exact math; only fp32 ties may flip a few codes between block sizes

OC, IC, N = 64, 128, 2048
LAYOUTS = [("oc", 32), ("oc", -1), ("ic", 16)]


def _args(layout, group, bits=4, symmetric=True):
    return QuantArgs(bits=bits, group_size=group, symmetric=symmetric, layout=layout)


def _correlated(seed=0):
    """W [OC, IC], X [N, IC] with strongly correlated inputs (a random mix of 16 sources plus small noise)."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(N, 16, generator=gen)
    M = torch.randn(16, IC, generator=gen)
    X = Z @ M + 0.1 * torch.randn(N, IC, generator=gen)                 # [N, IC]
    X = X * torch.rand(IC, generator=gen) * 2                          # uneven diag(H) so act-order matters
    W = torch.randn(OC, IC, generator=gen)
    return W, X


def _hessian(X):
    return accumulate_hessian(None, X, 0)[0]


def _expand(t, args, shape):
    """scale/zero [OC, G] or [G, IC] -> [OC, IC]."""
    if args.layout == "oc":
        return t.repeat_interleave(shape[1] // t.shape[1], dim=1)
    return t.repeat_interleave(shape[0] // t.shape[0], dim=0)


def test_accumulate_hessian_batches_equal_whole():
    torch.manual_seed(0)
    X = torch.randn(300, 24)
    H, n = None, 0
    for part in X.split([100, 50, 150]):
        H, n = accumulate_hessian(H, part, n)
    assert n == 300
    torch.testing.assert_close(H, 2 / 300 * X.t() @ X, rtol=HESSIAN_RTOL, atol=HESSIAN_RTOL)


@pytest.mark.parametrize("layout,group", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", [False, True])
def test_identity_hessian_reproduces_rtn(layout, group, symmetric, actorder):
    torch.manual_seed(0)
    W = torch.randn(OC, IC)
    args = _args(layout, group, symmetric=symmetric)
    res = gptq_quantize(W, torch.eye(IC), args, block_size=32, actorder=actorder)
    codes, scale, zero, W_hat = quantize_rtn(W, args)
    assert not res.fallback
    assert torch.equal(res.codes, codes)
    assert torch.equal(res.scale, scale)
    assert torch.equal(res.W_hat, W_hat)
    assert (res.zero is None) == symmetric and (symmetric or torch.equal(res.zero, zero))
    # H = 1.01·I after damping, so d² = 1/1.01 for every column.
    expected = ((W - W_hat) ** 2).sum().item() * 1.01 / 2
    assert res.loss == pytest.approx(expected, rel=LOSS_RTOL)


@pytest.mark.parametrize("layout,group", [("oc", 32), ("ic", 16)])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("actorder", [False, True])
def test_correlated_hessian_beats_rtn(layout, group, bits, actorder):
    W, X = _correlated()
    args = _args(layout, group, bits=bits)
    res = gptq_quantize(W, _hessian(X), args, block_size=32, actorder=actorder)
    W_rtn = quantize_rtn(W, args)[3]
    err_gptq = (X @ (W - res.W_hat).t()).pow(2).sum()
    err_rtn = (X @ (W - W_rtn).t()).pow(2).sum()
    assert not res.fallback
    assert err_gptq < GPTQ_MARGIN * err_rtn


@pytest.mark.parametrize("layout,group", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", [False, True])
def test_w_hat_is_dequantized_codes_and_loss_identity(layout, group, symmetric, actorder):
    W, X = _correlated(seed=1)
    H = _hessian(X)
    args = _args(layout, group, bits=3, symmetric=symmetric)
    res = gptq_quantize(W, H, args, block_size=32, actorder=actorder)
    assert res.codes.dtype == torch.int8 and res.codes.shape == (OC, IC)
    assert res.codes.min() >= args.qmin and res.codes.max() <= args.qmax
    scale = _expand(res.scale, args, W.shape)
    zero = None if res.zero is None else _expand(res.zero, args, W.shape)
    assert torch.equal(res.W_hat, dequantize(res.codes.float(), scale, zero))
    # Each OBS step adds exactly its Losses term, so the total is ½ tr(ΔW H_damped ΔWᵀ) (GPTQ paper §3).
    H_damped = H + res.damp * torch.diag(H).mean() * torch.eye(IC)
    dW = (W - res.W_hat).double()
    assert res.loss == pytest.approx(0.5 * (dW @ H_damped.double() * dW).sum().item(), rel=LOSS_RTOL)


@pytest.mark.parametrize("layout,group", LAYOUTS)
@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("dead", [False, True])
def test_error_trace_is_the_undamped_error(layout, group, actorder, dead):
    """What the engine reports instead of recomputing tr(ΔW H ΔWᵀ): 2·Σ losses − λ‖ΔW‖², exact up to fp32 rounding,
    with the original W on a dead column (H's row there is 0, so it adds nothing)."""
    W, X = _correlated(seed=5)
    if dead:
        X[:, 7] = 0
    H = _hessian(X)
    res = gptq_quantize(W, H, _args(layout, group, bits=3), block_size=32, dampening_frac=0.05, actorder=actorder)
    dW = (W - res.W_hat).double()
    assert res.error_trace == pytest.approx((dW @ H.double() * dW).sum().item(), rel=1e-4)
    H_damped = H + res.damp * torch.diag(H).mean() * torch.eye(IC)
    assert (dW @ H_damped.double() * dW).sum().item() > 1.01 * res.error_trace      # the damping term is not zero


@pytest.mark.parametrize("layout,group", LAYOUTS)
def test_block_size_does_not_change_result(layout, group):
    W, X = _correlated(seed=4)
    H = _hessian(X)
    args = _args(layout, group, bits=3)
    small = gptq_quantize(W, H, args, block_size=8)
    whole = gptq_quantize(W, H, args, block_size=IC)
    assert (small.codes != whole.codes).float().mean() <= BLOCK_FLIP_FRAC


@pytest.mark.parametrize("actorder", [False, True])
def test_dead_column_is_zeroed(actorder):
    W, X = _correlated(seed=2)
    X[:, 5] = 0
    H = _hessian(X)
    H_before = H.clone()
    res = gptq_quantize(W, H, _args("oc", 32), actorder=actorder)
    assert not res.fallback
    assert torch.isfinite(res.W_hat).all() and math.isfinite(res.loss)
    assert torch.equal(res.W_hat[:, 5], torch.zeros(OC))
    assert torch.equal(H, H_before)                                    # the caller's H is not modified


@pytest.mark.parametrize("H", [
    torch.full((IC, IC), float("nan")),
    -100 * torch.eye(IC),                                              # stays non-PD under any damping
], ids=["nan", "negative_definite"])
def test_failed_cholesky_falls_back_to_rtn(H):
    torch.manual_seed(0)
    W = torch.randn(OC, IC)
    args = _args("oc", 32)
    res = gptq_quantize(W, H, args, dampening_frac=0.01, max_damp_tries=3)
    assert res.fallback
    assert res.damp == pytest.approx(0.01 * 10**3)
    assert torch.equal(res.W_hat, quantize_rtn(W, args)[3])
    assert torch.equal(res.codes, quantize_rtn(W, args)[0])


def test_singular_hessian_retries_damping():
    # A rank-1 H has a zero pivot: undamped Cholesky fails, the first retry (0.01) succeeds.
    torch.manual_seed(0)
    W = torch.randn(OC, IC)
    res = gptq_quantize(W, torch.ones(IC, IC), _args("oc", 32), dampening_frac=0.0)
    assert not res.fallback
    assert res.damp == pytest.approx(0.01)


def test_actorder_static_groups_keep_original_group_scale():
    W, X = _correlated(seed=3)
    args = _args("oc", 32)
    res = gptq_quantize(W, _hessian(X), args, actorder=True)
    _, rtn_scale, _, _ = quantize_rtn(W, args)
    assert res.scale.shape == (OC, IC // 32)
    assert torch.equal(res.scale, rtn_scale)                           # static: from the unpermuted W up front
    assert not torch.equal(res.W_hat, quantize_rtn(W, args)[3])        # GPTQ still moved the codes
    q = res.W_hat / _expand(res.scale, args, W.shape)
    assert torch.equal(q, q.round())
