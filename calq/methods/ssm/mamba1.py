"""A simulated-quantization Mamba1 mixer with every quantization point of Quamba made explicit.

Replaces transformers' `MambaMixer` inside a block (same call signature, full-sequence path only). The steps
and names follow quamba.md "Mamba1 block" 1–8; shapes B (batch), L (tokens), d (hidden), E (intermediate),
N (state), R (dt rank). Hooks cannot express what this needs: x and z share one scale, dt and B and C share
one, the clipped û feeds both x_proj and the scan, and dt is quantized before its bias is added.

Modes: "calibrate" runs the fp mixer (Hadamard already inserted, weights fp) and feeds the observers;
`finalize()` turns observers into scales and quantizes the weights; "quant" then runs the fake-quant mixer.
The scan runs in fp32 on dequantized inputs (calq.zoo.scan's chunked closed form, exact to fp32 rounding
at chunk 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calq.methods.ssm.hadamard import Hadamard
from calq.methods.ssm.observers import MinMax, PercentileEMA, QuantPoints, scale_from
from calq.methods.ssm.plan import QuantPlan
from calq.methods.ssm.weights import QWeight, quant_groups_gptq, quant_groups_rtn, quant_per_tensor
from calq.zoo.scan import chunked_selective_scan

# Per step the chunked scan floors a decay at exp(-80/chunk); at 4 that is e^-20, far below fp32 noise of h.
SCAN_CHUNK = 4
# activation sites in forward order: in_proj input, x|z, û, dt|B|C, dt_proj output (pre-bias), y
ACT_SITES = ("in", "xz", "u", "xp", "dt", "y")
LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
SSM_PARAMS = ("conv_w", "conv_b", "dt_bias", "A_log", "D")


class QMamba1Mixer(QuantPoints):
    def __init__(self, mixer: nn.Module, plan: QuantPlan, had_y: Hadamard | None, mode: str = "calibrate"):
        super().__init__()
        if mixer.in_proj.bias is not None or mixer.out_proj.bias is not None:
            raise NotImplementedError("Quamba simulation assumes bias-free in_proj/out_proj (use_bias=False)")
        if mixer.conv1d.bias is None:
            raise NotImplementedError("Quamba simulation assumes a conv1d bias (use_conv_bias=True)")
        self.plan, self.had_y, self.mode = plan, had_y, mode
        self.E, self.N, self.R = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
        self.k = mixer.conv_kernel_size
        self.layer_idx = mixer.layer_idx
        f = lambda t: t.detach().float().clone()   # noqa: E731
        W_out = f(mixer.out_proj.weight)                                   # [d, E]
        if had_y is not None:
            W_out = had_y.rotate_input(W_out)                              # W_out·H_Eᵀ: y is rotated online
        for name, t in {"in_proj": f(mixer.in_proj.weight), "x_proj": f(mixer.x_proj.weight),
                        "dt_proj": f(mixer.dt_proj.weight), "out_proj": W_out,
                        "conv_w": f(mixer.conv1d.weight), "conv_b": f(mixer.conv1d.bias),
                        "dt_bias": f(mixer.dt_proj.bias), "A_log": f(mixer.A_log), "D": f(mixer.D)}.items():
            self.register_buffer(name, t)
        for site in ACT_SITES:
            self.register_buffer(f"s_{site}", torch.ones(()))
        self.observers = {s: MinMax() for s in ACT_SITES}
        if plan.percentile is not None:
            self.observers["u"] = PercentileEMA(plan.percentile)
        self.hessians: dict[str, tuple[torch.Tensor | None, int]] = {}
        self.qweights: dict[str, QWeight] = {}

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **_):
        if cache_params is not None:
            raise NotImplementedError("the simulated Quamba mixer runs full sequences only (use_cache=False)")
        dtype = hidden_states.dtype
        h = hidden_states.float()
        if attention_mask is not None:
            h = h * attention_mask[:, :, None]
        L = h.shape[1]
        self._hessian("in_proj", h)
        x_in = self._act("in", h)                                              # [B, L, d]
        xz = self._act("xz", x_in @ self.in_proj.T)                            # [B, L, 2E], one scale for x and z
        x, z = xz.chunk(2, dim=-1)                                             # [B, L, E] each
        conv = F.conv1d(x.transpose(1, 2), self.conv_w, self.conv_b, padding=self.k - 1, groups=self.E)
        u = self._act("u", F.silu(conv[..., :L]).transpose(1, 2))             # [B, L, E]; the same û twice
        if attention_mask is not None:
            u = u * attention_mask[:, :, None]
        xp = self._act("xp", u @ self.x_proj.T)                                # [B, L, R+2N], one scale
        dt_r, B, C = xp.split([self.R, self.N, self.N], dim=-1)
        dt = self._act("dt", dt_r @ self.dt_proj.T)                            # [B, L, E], bias added below
        A = -torch.exp(self.A_log)                                             # [E, N]
        y = chunked_selective_scan(u.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2),
                                   C.transpose(1, 2), D=self.D, z=z.transpose(1, 2), delta_bias=self.dt_bias,
                                   delta_softplus=True, chunk=SCAN_CHUNK).transpose(1, 2)   # [B, L, E]
        if self.mode == "quant":
            y = y.half().float()                                               # the kernels write y in fp16
        if self.had_y is not None:
            y = self.had_y.apply(y)                                            # ỹ = y·H_Eᵀ
        self._hessian("out_proj", y)
        y = self._act("y", y)
        return (y @ self.out_proj.T).to(dtype)

    # -- calibration → quantized -----------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> None:
        """Scales from the observers, weights quantized in place (W_hat), mode "quant"."""
        plan = self.plan
        if plan.quant_acts:
            for site in ACT_SITES:
                getattr(self, f"s_{site}").copy_(scale_from(self.observers[site].absmax()))
        for name in LINEARS:
            W = getattr(self, name)
            if plan.w_bits == 8 or (name == "dt_proj" and plan.ssm_bits == 8):
                q = quant_per_tensor(W)
            elif name == "dt_proj":
                q = None                                                       # fp16 (W4A16)
            elif name in self.hessians:
                H, _ = self.hessians[name]
                q = quant_groups_gptq(W, H, 4, plan.group_size, plan.dampening_frac)
            else:
                q = quant_groups_rtn(W, 4, plan.group_size)                    # x_proj, or gptq off
            self._set(name, q)
        for name in SSM_PARAMS:
            self._set(name, quant_per_tensor(getattr(self, name)) if plan.ssm_bits == 8 else None)
        self.observers, self.hessians = {}, {}
        self.mode = "quant"

    def segments_of(self, name: str) -> list[int] | None:
        return None                                                            # Mamba1: one scale per tensor

    def prepare_rebuild(self) -> None:
        """Before loading stored tensors: nothing to undo (out_proj is stored rotated, as held here)."""

    def _set(self, name: str, q: QWeight | None) -> None:
        t = getattr(self, name)
        if q is None:
            t.copy_(t.half().float())                                          # stored as fp16
        else:
            self.qweights[name] = q
            t.copy_(q.W_hat)
