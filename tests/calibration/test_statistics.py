"""The engine's statistics: shared inputs, massive tokens held apart, robust vs all-token Hessians."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calq.calibration.adapters import attach_adapter
from calq.calibration.statistics import Statistics
from calq.methods.gptq import accumulate_hessian, gptq_quantize
from calq.methods.quantizer import QuantArgs, quantize_rtn


def _inputs(seed=0, sink=1e3):
    """[2, 64, 16] ordinary tokens; token 0 of each sample a massive activation on channel 3 (an attention sink)."""
    torch.manual_seed(seed)
    X = torch.randn(2, 64, 16)
    X[:, 0] = 0.01 * torch.randn(2, 16)
    X[:, 0, 3] = sink
    return X


def _run(X, ratio):
    lin = nn.Linear(16, 8, bias=False)
    with Statistics({"l": lin}, massive_ratio=ratio) as hess, torch.no_grad():
        for x in X.split(1):            # two batches
            lin(x)
    return hess


def test_massive_tokens_are_held_apart_exactly():
    X = _inputs()
    flat = X.reshape(-1, 16)
    ordinary = torch.ones(128, dtype=torch.bool)
    ordinary[[0, 64]] = False
    hess = _run(X, 1000.0)
    H, n = hess.of("l")
    H_ref, n_ref = accumulate_hessian(None, flat[ordinary], 0)
    assert n == n_ref == 126 and torch.allclose(H, H_ref, rtol=1e-5, atol=1e-6)
    H_all, n_all = hess.of("l", robust=False)
    H_all_ref, _ = accumulate_hessian(None, flat, 0)
    assert n_all == 128 and torch.allclose(H_all, H_all_ref, rtol=1e-4)
    assert torch.allclose(hess.diag_all("l"), torch.diagonal(H_all_ref), rtol=1e-4)
    assert hess.excluded_of("l") == 2
    # importance statistics count every token
    assert hess.absmax_of("l")[3] == 1e3
    assert torch.allclose(hess.absmean_of("l"), flat.abs().mean(0), rtol=1e-5)


def test_output_energy_is_the_trace_of_w_h_w():
    """tr(W H Wᵀ) from the Linears' outputs (bias removed, massive tokens left out like H) for two Linears that
    share the input; none for a Linear whose adapter changes its output."""
    torch.manual_seed(1)
    X = _inputs()
    a, b = nn.Linear(16, 8), nn.Linear(16, 4, bias=False)
    with Statistics({"a": a, "b": b}, massive_ratio=1000.0) as hess, torch.no_grad():
        for x in X.split(1):
            a(x), b(x)
    H, _ = hess.of("a")
    for name, lin in (("a", a), ("b", b)):
        W = lin.weight.double()
        assert hess.energy_of(name) == pytest.approx((W @ H.double() * W).sum().item(), rel=1e-5)
    attach_adapter(b, torch.randn(2, 16), torch.randn(4, 2))
    with Statistics({"b": b}) as hess, torch.no_grad():
        b(X)
    assert hess.energy_of("b") is None


def test_no_ratio_or_no_massive_token_changes_nothing():
    X = _inputs(sink=3.0)
    for ratio in (None, 1000.0):
        hess = _run(X, ratio)
        H, n = hess.of("l")
        assert n == 128 and hess.excluded_of("l") == 0
        assert torch.equal(H, hess.of("l", robust=False)[0])
    hess = _run(_inputs(), None)
    assert hess.excluded_of("l") == 0 and hess.of("l")[1] == 128


def test_gptq_ordered_by_every_token_keeps_the_sink_column_at_rtn():
    """Robust H alone pushes error into the column only massive tokens read; ordering by all tokens puts that
    column first, so it is rounded from its own values (RTN's codes) and the other tokens still get GPTQ."""
    torch.manual_seed(0)
    X = torch.randn(4096, 64) @ torch.randn(64, 64) * 0.1                # correlated: GPTQ has work to do
    X[:, 5] = 0.01 * X[:, :8].sum(1) + 0.002 * torch.randn(4096)         # a channel ordinary tokens barely use
    X[::512] = 0.01
    X[::512, 5] = 500.0                                                  # 8 sinks on it
    W = torch.randn(32, 64)
    args = QuantArgs(bits=3, group_size=16)
    sink = torch.zeros(4096, dtype=torch.bool)
    sink[::512] = True
    H_robust = accumulate_hessian(None, X[~sink], 0)[0]
    H_all = accumulate_hessian(None, X, 0)[0]
    rtn = quantize_rtn(W, args)[3]
    plain = gptq_quantize(W, H_robust, args, actorder=True).W_hat
    ordered = gptq_quantize(W, H_robust, args, actorder=True, order=torch.diagonal(H_all)).W_hat

    def err(W_hat, rows):
        return float(((W - W_hat) @ X[rows].t()).norm() / (W @ X[rows].t()).norm())

    assert torch.equal(ordered[:, 5], rtn[:, 5])                         # the sink column: rounded, untouched
    assert (W - plain)[:, 5].norm() > 1.5 * (W - rtn)[:, 5].norm()       # without the order it absorbs error
    assert err(ordered, sink) < 0.7 * err(plain, sink)
    assert err(ordered, ~sink) < 0.8 * err(rtn, ~sink)                   # everyone else still gets GPTQ


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_ratio_must_exceed_one(ratio):
    from calq.errors import RecipeError
    from calq.recipe.schema import validate_recipe

    with pytest.raises(RecipeError, match="massive_token_ratio"):
        validate_recipe({"calibration": {"massive_token_ratio": ratio}, "stages": [{"method": "rtn"}]})


def test_reported_errors_equal_the_recomputed_ones(monkeypatch):
    """The engine takes GPTQ's error from its solve and tr(W H Wᵀ) from the calibration forward; recomputing both
    from H (the GEMMs they replace) gives the same relative errors, for GPTQ and for EoRA's before/after."""
    import calq.calibration.engine as engine
    from calq.api import compress_model, load_model
    from calq.recipe.schema import validate_recipe

    recipe = validate_recipe({"model": "zoo:llama", "calibration": {"num_samples": 4, "seq_len": 64},
                              "stages": [{"method": "gptq", "bits": 3}, {"method": "eora", "rank": 4}]})

    def run():
        model, tok, dtype = load_model("zoo:llama")
        return compress_model(model, tok, recipe, torch.device("cpu"), dtype)

    fast = run()
    gemm = engine._rel_error
    monkeypatch.setattr(engine, "_rel_error", lambda W, W_hat, H, num=None, den=None: gemm(W, W_hat, H))
    slow = run()
    assert len(fast.modules) == len(slow.modules) > 0
    for f, s in zip(fast.modules, slow.modules, strict=True):
        assert f.rel_error == pytest.approx(s.rel_error, rel=1e-5)
    for f, s in zip(fast.adapters, slow.adapters, strict=True):
        assert (f.rel_error_before, f.rel_error_after) == pytest.approx((s.rel_error_before, s.rel_error_after),
                                                                         rel=1e-5)
