"""Quamba2's sort-and-cluster of Mamba2's x (quamba.md, "Quamba2: extra steps" 3), without scikit-learn.

Per SSD group: sort each head's channels by their calibrated mean |x|, cluster the heads' normalised sorted
profiles with Ward's agglomerative clustering, then split the sorted positions of each head cluster into
contiguous ranges with k-means initialised at 0, hd/4, hd/2, 3hd/4. Every (group, head cluster, dim cluster)
gets one scale. Ward and k-means are written out here (few points: heads per group, head_dim positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ward(points: torch.Tensor, k: int) -> torch.Tensor:
    """Ward agglomerative clustering of points [P, F] into min(k, P) clusters. Labels [P], numbered in order
    of each cluster's first point (so equal inputs give equal labels, whatever the merge order)."""
    P = points.shape[0]
    clusters = [[i] for i in range(P)]
    pts = points.double()
    while len(clusters) > min(k, P):
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                na, nb = len(clusters[a]), len(clusters[b])
                d = pts[clusters[a]].mean(0) - pts[clusters[b]].mean(0)
                cost = na * nb / (na + nb) * float(d @ d)      # increase of the within-cluster sum of squares
                if best is None or cost < best[0]:
                    best = (cost, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    labels = torch.empty(P, dtype=torch.long)
    for i, c in enumerate(sorted(clusters, key=min)):
        labels[c] = i
    return labels


def contiguous_kmeans(points: torch.Tensor, k: int, iters: int = 100) -> torch.Tensor:
    """k-means of points [P, F] ordered along P, initialised at positions 0, P/k, 2P/k, …; returns
    non-decreasing labels [P] (contiguous ranges). Quamba2 reads its k-means labels as ranges; on sorted
    profiles Lloyd's assignment is almost always monotone, and where it is not the running max makes it so."""
    P = points.shape[0]
    k = min(k, P)
    pts = points.double()
    centres = pts[[i * P // k for i in range(k)]].clone()
    labels = torch.zeros(P, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(pts, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                centres[j] = pts[labels == j].mean(0)
    order = torch.argsort(centres[:, 0] if centres.shape[1] else torch.arange(k), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    return torch.cummax(rank[labels], 0).values


@dataclass
class Clusters:
    perm: torch.Tensor          # π [d_ssm]: new channel c holds old channel perm[c]
    head_perm: torch.Tensor     # ρ [nheads]: new head i is old head head_perm[i] (never leaves its SSD group)
    head_ranges: torch.Tensor   # int32 [ng, k+1]: cumulative head counts per head cluster, within the group
    dim_ranges: torch.Tensor    # int32 [ng, k, k+1]: cumulative sorted-position counts per dim cluster

    def channel_groups(self, head_dim: int) -> torch.Tensor:
        """Group index g·k·k + hg·k + dg of every (permuted) channel [d_ssm]."""
        ng, k = self.dim_ranges.shape[:2]
        hpg = int(self.head_ranges[0, -1])
        out = torch.empty(ng * hpg * head_dim, dtype=torch.long)
        for g in range(ng):
            for hg in range(k):
                for h in range(int(self.head_ranges[g, hg]), int(self.head_ranges[g, hg + 1])):
                    base = (g * hpg + h) * head_dim
                    for dg in range(k):
                        lo, hi = int(self.dim_ranges[g, hg, dg]), int(self.dim_ranges[g, hg, dg + 1])
                        out[base + lo:base + hi] = g * k * k + hg * k + dg
        return out


def sort_and_cluster(m: torch.Tensor, n_groups: int, n_heads: int, head_dim: int, k: int = 4) -> Clusters:
    """m: calibrated per-channel statistic of x [d_ssm] (mean_t |x|, max over samples)."""
    hpg = n_heads // n_groups
    M = m.float().reshape(n_groups, hpg, head_dim)
    perm, head_perm = [], []
    head_ranges = torch.zeros(n_groups, k + 1, dtype=torch.int32)
    dim_ranges = torch.zeros(n_groups, k, k + 1, dtype=torch.int32)
    for g in range(n_groups):
        S, dim_order = M[g].sort(dim=-1, stable=True)                          # [hpg, hd] ascending
        S_hat = S / S.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        labels = ward(S_hat, k)                                                # [hpg]
        heads = torch.argsort(labels, stable=True)                             # heads ordered by cluster
        counts = torch.bincount(labels, minlength=k)
        head_ranges[g, 1:] = counts.cumsum(0).to(torch.int32)
        for hg in range(k):
            members = heads[head_ranges[g, hg]:head_ranges[g, hg + 1]]
            if len(members) == 0:
                dim_ranges[g, hg, 1:] = head_dim                               # an empty head cluster
                continue
            dl = contiguous_kmeans(S_hat[members].T, k)                        # positions as points [hd, |hg|]
            dim_ranges[g, hg, 1:] = torch.bincount(dl, minlength=k).cumsum(0).to(torch.int32)
        for h in heads.tolist():
            head_perm.append(g * hpg + h)
            perm.append((g * hpg + h) * head_dim + dim_order[h])
    return Clusters(torch.cat(perm), torch.tensor(head_perm), head_ranges, dim_ranges)
