"""The simulated mixers against transformers' own paths, before any quantization."""

import pytest
import torch
import torch.nn.functional as F

from calq.methods.ssm.hadamard import hadamard
from calq.methods.ssm.mamba1 import QMamba1Mixer
from calq.methods.ssm.mamba2 import QMamba2Mixer
from calq.methods.ssm.plan import QuantPlan
from calq.methods.ssm.ssd import gated_rmsnorm, ssd_scan

# fp32 vectorised scans vs transformers' fp32 paths (a token loop for Mamba1): rounding only
LOGITS_ATOL = 1e-4


def _tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2,
                                        expand=2)).eval()


def _tiny_mamba2(n_groups=2):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, head_dim=8,
                       num_heads=8, n_groups=n_groups, chunk_size=16)
    return Mamba2ForCausalLM(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_ssd_scan_matches_recurrence():
    torch.manual_seed(0)
    b, L, h, p, g, n = 2, 45, 4, 8, 2, 6                        # L not a multiple of the chunk
    x = torch.randn(b, L, h, p, dtype=torch.float64)
    dt = F.softplus(torch.randn(b, L, h, dtype=torch.float64))
    A, D = -torch.exp(torch.randn(h, dtype=torch.float64)), torch.randn(h, dtype=torch.float64)
    B, C = torch.randn(b, L, g, n, dtype=torch.float64), torch.randn(b, L, g, n, dtype=torch.float64)
    Bh, Ch = B.repeat_interleave(h // g, 2), C.repeat_interleave(h // g, 2)
    s, ref = torch.zeros(b, h, p, n, dtype=torch.float64), []
    for t in range(L):
        s = torch.exp(dt[:, t] * A)[:, :, None, None] * s + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        ref.append((s * Ch[:, t, :, None]).sum(-1) + D[:, None] * x[:, t])
    ref = torch.stack(ref, 1)
    got = ssd_scan(x, dt, A, B, C, D, chunk=16)
    assert torch.allclose(got.double(), ref, atol=1e-5 * ref.abs().max())


def test_grouped_gated_norm_matches_direct_computation():
    torch.manual_seed(0)
    y, z, w = torch.randn(3, 5, 24), torch.randn(3, 5, 24), torch.randn(24)
    direct = torch.empty_like(y)
    for g in range(3):                                          # n_groups = 3, groups of 8 channels
        v = y[..., 8 * g:8 * g + 8] * z[..., 8 * g:8 * g + 8] * torch.sigmoid(z[..., 8 * g:8 * g + 8])
        direct[..., 8 * g:8 * g + 8] = v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-5)
    direct = direct * w
    got = gated_rmsnorm(y, z, w, 3, 1e-5)
    assert torch.allclose(got, direct, atol=1e-5)
    assert not torch.allclose(gated_rmsnorm(y, z, w, 1, 1e-5), direct, atol=1e-2)   # the grouping matters


@pytest.mark.parametrize("had", [False, True])
def test_mamba1_mixer_matches_transformers(had):
    model = _tiny_mamba()
    ids = torch.randint(0, 64, (2, 37))
    ref = _logits(model, ids)
    for layer in model.backbone.layers:
        layer.mixer = QMamba1Mixer(layer.mixer, QuantPlan(), hadamard(64) if had else None, mode="fp")
    assert torch.allclose(_logits(model, ids), ref, atol=LOGITS_ATOL)


def test_mamba2_mixer_and_reorder_match_transformers():
    model = _tiny_mamba2(n_groups=2)
    ids = torch.randint(0, 64, (2, 37))
    ref = _logits(model, ids)
    mixers = []
    for layer in model.backbone.layers:
        layer.mixer = QMamba2Mixer(layer.mixer, QuantPlan(), hadamard(64), mode="calibrate")
        mixers.append(layer.mixer)
    assert torch.allclose(_logits(model, ids), ref, atol=LOGITS_ATOL)
    for m in mixers:
        m.reorder()                                             # sort-and-cluster permutation: exact in fp
    assert any(not torch.equal(m.clusters.perm, torch.arange(64)) for m in mixers)
    assert torch.allclose(_logits(model, ids), ref, atol=LOGITS_ATOL)


def test_quantized_mixers_change_logits_a_little():
    for build, cls, n in ((_tiny_mamba, QMamba1Mixer, 64), (_tiny_mamba2, QMamba2Mixer, 64)):
        model = build()
        ids = torch.randint(0, 64, (4, 33))
        ref = _logits(model, ids)
        mixers = []
        for layer in model.backbone.layers:
            layer.mixer = cls(layer.mixer, QuantPlan(), hadamard(n))
            mixers.append(layer.mixer)
        _logits(model, ids)                                    # calibrate
        for m in mixers:
            m.finalize()
        got = _logits(model, ids)
        err = (got - ref).norm() / ref.norm()
        assert 0 < err < 0.1, (cls.__name__, err)
