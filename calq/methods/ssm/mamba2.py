"""A simulated-quantization Mamba2 mixer with Quamba2's quantization points (quamba.md "Quamba2" 3–6).

Replaces transformers' `Mamba2Mixer` (full-sequence path). in_proj's output [z | x B C | dt] gets five
per-tensor scales (and, at 8 bits, five per-tensor weight scales); the conv output x one scale per
(SSD group, head cluster, dim cluster) after sort-and-cluster, B and C one per SSD group; dt is quantized
before its fp16 bias; the SSD scan runs in fp32; the gated RMSNorm is grouped (n_groups); y is rotated
online before out_proj. Flow: calibrate → `reorder()` (exact permutation) → calibrate again → `finalize()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calq.methods.ssm.cluster import Clusters, sort_and_cluster
from calq.methods.ssm.hadamard import Hadamard
from calq.methods.ssm.observers import ChannelStats, MinMax, QuantPoints, scale_from
from calq.methods.ssm.plan import QuantPlan
from calq.methods.ssm.ssd import gated_rmsnorm, ssd_scan
from calq.methods.ssm.weights import QWeight, quant_groups_gptq, quant_groups_rtn, quant_per_tensor

# in_proj input, its five outputs, the conv outputs x (grouped), B and C (per SSD group), the out_proj input
ACT_SITES = ("in", "z", "x", "B", "C", "dt", "x_conv", "B_conv", "C_conv", "y")


class QMamba2Mixer(QuantPoints):
    def __init__(self, mixer: nn.Module, plan: QuantPlan, had_y: Hadamard | None, mode: str = "calibrate"):
        super().__init__()
        if mixer.in_proj.bias is not None or mixer.out_proj.bias is not None or mixer.conv1d.bias is None:
            raise NotImplementedError("Quamba2 simulation assumes use_bias=False and use_conv_bias=True")
        self.plan, self.had_y, self.mode = plan, had_y, mode
        self.E, self.nh, self.hd = mixer.intermediate_size, mixer.num_heads, mixer.head_dim
        self.ng, self.N, self.k = mixer.n_groups, mixer.ssm_state_size, mixer.conv_kernel_size
        self.chunk, self.eps = mixer.chunk_size, mixer.norm.variance_epsilon
        self.dt_limit = tuple(float(v) for v in mixer.time_step_limit)
        self.layer_idx = mixer.layer_idx
        self.splits = [self.E, self.E, self.ng * self.N, self.ng * self.N, self.nh]   # z, x, B, C, dt rows
        f = lambda t: t.detach().float().clone()   # noqa: E731
        # out_proj stays unrotated until finalize(): reorder() permutes its columns first (spec: reorder, then fuse)
        for name, t in {"in_proj": f(mixer.in_proj.weight), "out_proj": f(mixer.out_proj.weight),
                        "conv_w": f(mixer.conv1d.weight), "conv_b": f(mixer.conv1d.bias),
                        "dt_bias": f(mixer.dt_bias), "A_log": f(mixer.A_log), "D": f(mixer.D),
                        "norm_w": f(mixer.norm.weight)}.items():
            self.register_buffer(name, t)
        self.rotated = False
        for site in ACT_SITES:                       # scalars, or per-channel vectors for the grouped sites
            self.register_buffer(f"s_{site}", torch.ones(()))
        self.clusters: Clusters | None = None
        self._reset_observers()
        self.hessians: dict[str, tuple[torch.Tensor | None, int]] = {}
        self.qweights: dict[str, QWeight] = {}

    def _reset_observers(self) -> None:
        self.observers = {s: ChannelStats() if s.endswith("_conv") else MinMax() for s in ACT_SITES}

    def forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **_):
        if cache_params is not None:
            raise NotImplementedError("the simulated Quamba2 mixer runs full sequences only (use_cache=False)")
        dtype = hidden_states.dtype
        h = hidden_states.float()
        if attention_mask is not None:
            h = h * attention_mask[:, :, None]
        b, L, _ = h.shape
        self._hessian("in_proj", h)
        proj = self._act("in", h) @ self.in_proj.T                             # [b, L, 2E + 2·ng·N + nh]
        z, x, B, C, dt = proj.split(self.splits, dim=-1)
        z, x, B, C, dt = (self._act(s, v) for s, v in zip(("z", "x", "B", "C", "dt"), (z, x, B, C, dt), strict=True))
        xBC = torch.cat([x, B, C], -1).transpose(1, 2)                         # [b, conv_dim, L]
        xBC = F.silu(F.conv1d(xBC, self.conv_w, self.conv_b, padding=self.k - 1, groups=xBC.shape[1])[..., :L])
        x, B, C = xBC.transpose(1, 2).split(self.splits[1:4], dim=-1)
        if attention_mask is not None:
            x = x * attention_mask[:, :, None]
        x, B, C = self._act("x_conv", x), self._act("B_conv", B), self._act("C_conv", C)
        dt = F.softplus(dt + self.dt_bias).clamp(*self.dt_limit)               # [b, L, nh]
        y = ssd_scan(x.reshape(b, L, self.nh, self.hd), dt, -torch.exp(self.A_log),
                     B.reshape(b, L, self.ng, self.N), C.reshape(b, L, self.ng, self.N), self.D,
                     self.chunk).reshape(b, L, self.E)
        if self.mode == "quant":
            y = y.half().float()                                               # scan output written in fp16
        y = gated_rmsnorm(y, z, self.norm_w, self.ng, self.eps)
        if self.mode == "quant":
            y = y.half().float()
        if self.had_y is not None:
            y_rot = self.had_y.apply(y)                                        # ỹ = y·H_Eᵀ
            self._hessian("out_proj", y_rot)
            if self.rotated:
                y = self._act("y", y_rot)
            else:                                                              # observe ỹ; exact fp output
                self._act("y", y_rot)
        else:
            self._hessian("out_proj", y)
            y = self._act("y", y)
        return (y @ self.out_proj.T).to(dtype)

    # -- sort-and-cluster --------------------------------------------------------------------------------------
    @torch.no_grad()
    def reorder(self) -> None:
        """Permute channels (π) and heads (ρ) so every x group is contiguous; exact in fp. Observers reset."""
        c = sort_and_cluster(self.observers["x_conv"].mean_abs, self.ng, self.nh, self.hd, self.plan.clusters)
        pi, rho = c.perm, c.head_perm
        E, ssm = self.E, self.splits
        rows = torch.arange(sum(ssm))
        rows[:E] = pi                                                          # z
        rows[E:2 * E] = E + pi                                                 # x
        rows[-self.nh:] = sum(ssm[:4]) + rho                                   # dt
        self.in_proj.copy_(self.in_proj[rows])
        conv_rows = torch.arange(self.conv_w.shape[0])
        conv_rows[:E] = pi
        self.conv_w.copy_(self.conv_w[conv_rows])
        self.conv_b.copy_(self.conv_b[conv_rows])
        for name in ("A_log", "D", "dt_bias"):
            getattr(self, name).copy_(getattr(self, name)[rho])
        self.norm_w.copy_(self.norm_w[pi])
        self.out_proj.copy_(self.out_proj[:, pi])
        self.clusters = c
        self._reset_observers()
        self.hessians = {}

    # -- calibration → quantized -----------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> None:
        plan = self.plan
        if self.had_y is not None:
            self.out_proj.copy_(self.had_y.rotate_input(self.out_proj))        # W_out·H_Eᵀ
            self.rotated = True
        if plan.quant_acts:
            self._set_act_scales()
        for name in ("in_proj", "out_proj"):
            W = getattr(self, name)
            if plan.w_bits == 8:
                q = quant_per_tensor(W, segments=self.splits if name == "in_proj" else None)
            elif name in self.hessians:
                q = quant_groups_gptq(W, self.hessians[name][0], 4, plan.group_size, plan.dampening_frac)
            else:
                q = quant_groups_rtn(W, 4, plan.group_size)
            self._set(name, q)
        if plan.ssm_bits == 8:
            conv_segments = self.splits[1:4]
            self._set("conv_w", quant_per_tensor(self.conv_w, segments=conv_segments))
            self._set("conv_b", quant_per_tensor(self.conv_b, segments=conv_segments))
            self._set("A_log", quant_per_tensor(self.A_log))
            self._set("D", quant_per_tensor(self.D))
        else:
            for name in ("conv_w", "conv_b", "A_log", "D"):
                self._set(name, None)
        self._set("dt_bias", None)                                             # Mamba2 keeps dt_bias fp16
        self._set("norm_w", None)
        self.observers, self.hessians = {}, {}
        self.mode = "quant"

    def _set_act_scales(self) -> None:
        obs = self.observers
        for site in ("in", "z", "x", "B", "C", "dt", "y"):
            setattr(self, f"s_{site}", scale_from(obs[site].absmax()))
        amax = obs["x_conv"].amax                                              # [E] → one scale per group
        if self.clusters is not None:
            groups = self.clusters.channel_groups(self.hd)
            gmax = torch.zeros(int(groups.max()) + 1).scatter_reduce(0, groups, amax, "amax")
            self.s_x_conv = scale_from(gmax[groups])
        else:
            self.s_x_conv = scale_from(amax.amax())
        for site in ("B_conv", "C_conv"):                                      # per state group [ng] → per channel
            per_group = obs[site].amax.reshape(self.ng, self.N).amax(-1)
            setattr(self, f"s_{site}", scale_from(per_group).repeat_interleave(self.N))

    def segments_of(self, name: str) -> list[int] | None:
        return {"in_proj": self.splits, "conv_w": self.splits[1:4], "conv_b": self.splits[1:4]}.get(name)

    def prepare_rebuild(self) -> None:
        """Before loading stored tensors: out_proj is stored already rotated."""
        self.rotated = self.had_y is not None

    def _set(self, name: str, q: QWeight | None) -> None:
        t = getattr(self, name)
        if q is None:
            t.copy_(t.half().float())
        else:
            self.qweights[name] = q
            t.copy_(q.W_hat)
