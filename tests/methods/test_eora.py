import pytest
import torch

from calq.methods.eora import eigen_sqrt, low_rank_compensation

# fp32 SVD/eigh residuals against the Eckart–Young bound: relative rounding only.
EY_RTOL = 1e-4


def _setup(N=2048, OC=48, IC=64, seed=0):
    torch.manual_seed(seed)
    X = (torch.randn(N, IC) @ torch.randn(IC, IC)) * torch.linspace(0.1, 3, IC)   # [N, IC], correlated
    W = torch.randn(OC, IC)
    W_hat = W + 0.1 * torch.randn(OC, IC)
    return X, W, W_hat, X.t() @ X


def _out_err(X, W, W_hat, B, A):
    return float(((W - W_hat - B @ A) @ X.t()).norm())


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_eora_reaches_the_eckart_young_bound(rank):
    X, W, W_hat, C = _setup()
    B, A, sigma = low_rank_compensation(W, W_hat, rank, "eora", C)
    bound = float(sigma[rank:].pow(2).sum().sqrt())
    assert _out_err(X, W, W_hat, B, A) == pytest.approx(bound, rel=EY_RTOL)
    assert B.shape == (48, rank) and A.shape == (rank, 64)


def test_eora_beats_baselines_beats_nothing():
    X, W, W_hat, C = _setup()
    errs = {b: _out_err(X, W, W_hat, *low_rank_compensation(W, W_hat, 8, b, C, X.abs().mean(0))[:2])
            for b in ("eora", "act-s", "svd")}
    none = float(((W - W_hat) @ X.t()).norm())
    assert errs["eora"] < errs["act-s"] < none and errs["eora"] < errs["svd"] < none, (errs, none)


def test_rank_above_min_dim_is_clamped_and_exact():
    _, W, W_hat, _ = _setup(OC=16, IC=24)
    X = torch.randn(4096, 24)                                # well conditioned: the cutoff keeps every mode
    B, A, _ = low_rank_compensation(W, W_hat, 100, "eora", X.t() @ X)
    assert A.shape[0] == 16
    assert torch.allclose(W_hat + B @ A, W, atol=1e-4)      # full rank on a full-rank C restores W


def test_rank_deficient_and_zero_covariance():
    X, W, W_hat, _ = _setup(N=10)                            # 10 tokens: C has rank 10 < IC
    C = X.t() @ X
    S, S_inv = eigen_sqrt(C)
    k = S.shape[1]          # the 10 real modes, and fp32 noise modes of C above fp64's numerical zero
    assert torch.isfinite(S_inv).all() and 10 <= k < 64 and S_inv.shape == (k, 64)
    assert torch.allclose(S @ S.t(), C.double(), atol=1e-5 * C.abs().max())
    assert torch.allclose(S_inv @ S, torch.eye(k, dtype=torch.float64), atol=1e-8)
    B, A, sigma = low_rank_compensation(W, W_hat, 4, "eora", C)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert _out_err(X, W, W_hat, B, A) == pytest.approx(float(sigma[4:].pow(2).sum().sqrt()), rel=EY_RTOL)
    B0, A0, _ = low_rank_compensation(W, W_hat, 4, "eora", torch.zeros(64, 64))
    assert not B0.any() and not A0.any()                    # nothing excited: nothing to compensate


def test_non_finite_covariance_is_an_error():
    _, W, W_hat, C = _setup()
    C[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        low_rank_compensation(W, W_hat, 4, "eora", C)


def test_corda_basis_is_close_to_but_not_better_than_eora():
    X, W, W_hat, C = _setup()
    err = {b: _out_err(X, W, W_hat, *low_rank_compensation(W, W_hat, 8, b, C)[:2]) for b in ("eora", "corda", "svd")}
    assert err["eora"] <= err["corda"] < err["svd"], err


def test_adapter_bits_round_a_and_b_on_the_grid():
    from calq.methods.eora import EoRA, EoRAConfig

    X, W, W_hat, C = _setup()
    stage = EoRA(EoRAConfig(method="eora", rank=8, adapter_bits=4))
    stats = {"original_weight": W, "hessian": C, "input_absmean": X.abs().mean(0), "scale_dtype": torch.float16}
    ad = stage.apply("m", W_hat, stats)
    for M in (ad.A, ad.B):                                    # 4-bit rows: at most 16 distinct values each
        assert max(len(torch.unique(row)) for row in M) <= 16 < len(torch.unique(M))
    assert ad.info["packed_bytes"] == (8 * 64 + 48 * 8) // 2 + 2 * (8 + 48)
    full = _out_err(X, W, W_hat, *low_rank_compensation(W, W_hat, 8, "eora", C)[:2])
    assert full < _out_err(X, W, W_hat, ad.B, ad.A) < float(((W - W_hat) @ X.t()).norm())


def test_gptq_rounding_of_the_adapter_beats_rtn_on_the_layer_output():
    from calq.methods.eora import EoRA, EoRAConfig

    X, W, W_hat, C = _setup()
    stats = {"original_weight": W, "hessian": C, "input_absmean": X.abs().mean(0), "scale_dtype": torch.float16}
    err = {}
    for q in ("rtn", "gptq"):
        ad = EoRA(EoRAConfig(method="eora", rank=8, adapter_bits=3, adapter_quant=q)).apply("m", W_hat, stats)
        assert max(len(torch.unique(row)) for row in ad.A) <= 8 and ad.info["adapter_quant"] == q
        err[q] = _out_err(X, W, W_hat, ad.B, ad.A)
    full = _out_err(X, W, W_hat, *low_rank_compensation(W, W_hat, 8, "eora", C)[:2])
    assert full < err["gptq"] < err["rtn"], (full, err)


def test_massive_activation_keeps_every_mode_and_amplifies_nothing():
    """One token with a massive channel (an attention sink, 2·10⁵× the median energy as in SmolLM2's layer 11):
    GPTQModel's fp32-precision cutoff would keep 1 mode and make rank-16 EoRA rank 1."""
    _, W, W_hat, _ = _setup()
    torch.manual_seed(1)
    X = torch.randn(4096, 64) * torch.linspace(0.1, 1, 64)     # ordinary tokens
    X[0] = 0
    X[0, 5] = 3e4                                             # the sink: one token, one channel
    C = X.t() @ X
    lam = torch.linalg.eigvalsh(C.double())
    assert int((lam > lam.max() * 64 * torch.finfo(torch.float32).eps).sum()) == 1     # the rule on C itself
    S, S_inv = eigen_sqrt(C)
    assert S.shape == (64, 64) and torch.allclose(S_inv @ S, torch.eye(64, dtype=torch.float64), atol=1e-8)
    rest = X[1:]
    err = {b: _out_err(rest, W, W_hat, *low_rank_compensation(W, W_hat, 16, b, C)[:2]) for b in ("eora", "svd")}
    assert err["eora"] < err["svd"] < float(((W - W_hat) @ rest.t()).norm()), err
    # every mode kept: BA = U_r U_rᵀ ΔW, bounded by ΔW however small a channel's scale
    Cw = C.clone()
    Cw[:, 7] *= 1e-6
    Cw[7, :] *= 1e-6
    B, A, _ = low_rank_compensation(W, W_hat, 16, "eora", Cw)
    assert torch.linalg.matrix_norm(B @ A, 2) <= torch.linalg.matrix_norm(W - W_hat, 2) * (1 + 1e-3)
