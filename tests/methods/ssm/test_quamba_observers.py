import torch

from calq.methods.ssm.cluster import contiguous_kmeans, sort_and_cluster, ward
from calq.methods.ssm.observers import MinMax, PercentileEMA, fake_quant, quantile, scale_from
from calq.methods.ssm.weights import quant_per_tensor


def test_fake_quant_rounds_half_to_even_and_clamps():
    v = torch.tensor([0.5, 1.5, 2.5, -200.0, 300.0])
    assert torch.equal(fake_quant(v, 1.0), torch.tensor([0.0, 2.0, 2.0, -128.0, 127.0]))
    assert scale_from(torch.tensor(127.0)) == 1.0 and scale_from(torch.tensor(0.0)) == 1.0


def test_quantile_matches_torch():
    torch.manual_seed(0)
    v = torch.randn(10_001)
    for a in (0.5, 0.99, 0.99999, 1.0):
        assert torch.allclose(quantile(v, a), torch.quantile(v, a), rtol=1e-4)   # torch places α·(n−1) in fp32


def test_percentile_ema_by_hand():
    obs = PercentileEMA(alpha=1.0)                  # α = 1: the per-sample max, so the EMA is easy to follow
    obs.observe(torch.tensor([[[1.0, -4.0]], [[2.0, 0.0]]]))     # two samples: p = 4, then 2
    assert torch.isclose(obs.absmax(), torch.tensor(4.0 + 0.01 * (2.0 - 4.0)))
    mm = MinMax()
    mm.observe(torch.tensor([1.0, -4.0]))
    mm.observe(torch.tensor([3.0]))
    assert mm.absmax() == 4.0


def test_segmented_weight_scales():
    W = torch.tensor([[1.0, -2.0], [0.5, 0.25], [10.0, 0.0]])
    q = quant_per_tensor(W, segments=[2, 1])
    assert torch.allclose(q.scale, torch.tensor([2 / 127, 10 / 127]))
    assert torch.equal(q.codes, torch.tensor([[64, -127], [32, 16], [127, 0]], dtype=torch.int8))


def test_ward_and_contiguous_kmeans():
    pts = torch.tensor([[0.0], [0.1], [5.0], [0.2], [5.1], [9.0]])
    assert ward(pts, 3).tolist() == [0, 0, 1, 0, 1, 2]
    labels = contiguous_kmeans(torch.linspace(0, 1, 32)[:, None] ** 3, 4)
    assert (labels.diff() >= 0).all() and labels.unique().numel() == 4


def test_sort_and_cluster_ranges():
    torch.manual_seed(0)
    m = torch.rand(2 * 8 * 16) ** 4                 # 2 groups × 8 heads × head_dim 16
    c = sort_and_cluster(m, n_groups=2, n_heads=16, head_dim=16, k=4)
    assert sorted(c.perm.tolist()) == list(range(256))
    assert (c.head_perm[:8] < 8).all() and (c.head_perm[8:] >= 8).all()          # heads stay in their group
    assert c.head_ranges[:, -1].tolist() == [8, 8] and (c.dim_ranges[..., -1] == 16).all()
    mp = m[c.perm].reshape(16, 16)
    assert (mp.diff(dim=-1) >= 0).all()             # channels sorted ascending inside every head
    assert c.channel_groups(16).max() < 2 * 4 * 4
