import pytest
import torch

from calq.methods.ssm.hadamard import hadamard, small_hadamard

# fp64 butterflies: orthonormality holds to a few ulps times log n
ORTHO_ATOL = 1e-12
# fp32 fusion vs the unrotated product, relative to the output scale
FUSE_RTOL = 1e-5


@pytest.mark.parametrize("K", [1, 2, 12, 20, 28, 40, 24, 36, 44, 60])
def test_small_factors_are_hadamard(K):
    H, source = small_hadamard(K)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.float64)), source


@pytest.mark.parametrize("n", [1, 64, 12 * 16, 20 * 8, 28 * 4, 40 * 16, 512, 768, 1536, 2560, 5120])
def test_orthonormal(n):
    h = hadamard(n)
    M = h.matrix()
    assert torch.allclose(M @ M.T, torch.eye(n, dtype=torch.float64), atol=ORTHO_ATOL)
    assert torch.allclose(M.abs(), torch.full_like(M, n ** -0.5))
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(h.apply(x), x @ M.T)            # the butterfly is the dense matrix


def test_k_choice_and_meta():
    assert hadamard(1536).K == 12 and hadamard(1536).source == "paley1:q=11"
    assert hadamard(5120).K == 20
    assert hadamard(512).K == 1
    assert hadamard(28 * 32).source == "paley2:q=13"
    assert hadamard(768).meta() == {"n": 768, "K": 12, "m": 64, "source": "paley1:q=11", "normalised": True,
                                    "signs": None}
    with pytest.raises(ValueError, match="52"):
        hadamard(52)                                         # 13·2^2: no Paley order 13, 26 or 52


def test_fusion_is_exact():
    torch.manual_seed(0)
    h = hadamard(768)
    x, W = torch.randn(5, 768), torch.randn(32, 768)
    ref = x @ W.T
    assert torch.allclose(h.apply(x) @ h.rotate_input(W).T, ref, atol=FUSE_RTOL * ref.abs().max())
    W2 = torch.randn(768, 16)                                 # output side: (x W2ᵀ... ) rotated by H
    assert torch.allclose(x[:, :16] @ h.rotate_output(W2).T, h.apply(x[:, :16] @ W2.T), atol=1e-4)
