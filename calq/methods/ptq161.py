"""PTQ1.61 (Zhao et al., ACL 2025; ../shared/methods/ptq161.md): about 1.6 bits per weight.

Per Linear, a 1-D mask keeps the input channels with the largest activations (20%) at 4 bits, per row over the
whole row; every other weight is binarized around its row mean, `r2 ⊙ r1 ⊙ (alpha·sign(W − mu) + mu)`, with
`alpha`, `r1` (rows) and `r2` (columns) learned per block against the full-precision block's outputs.
The storage is real: packed sign bits, packed 4-bit codes, the mask as a bitmap, fp16 row/column scales.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from calq.calibration.blocks import block_output, find_blocks, matches, split_batch, to_device
from calq.calibration.finetune import train_lora
from calq.errors import CalqError
from calq.methods.base import Packed
from calq.methods.registry import Method, StageConfig, register

SCALE_DTYPE = torch.float16     # every stored scale; the trained values are rounded to it before install


class Preprocess(BaseModel):
    """The restorative LoRA of §3.4: quantize, train a LoRA on top, merge, quantize again."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(100, ge=1)           # optimizer steps (paper: 10,000 on a GPU)
    rank: int = Field(64, ge=1)
    alpha: float = 16.0
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    warmup: float = Field(0.05, ge=0, lt=1)  # fraction of steps with a linear warmup, then cosine decay
    # not o_proj, as in the reference
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                        "down_proj"])


class PTQ161Config(StageConfig):
    salient_ratio: float = Field(0.2, gt=0, lt=1)
    salient_bits: int = Field(4, ge=2, le=8)
    statistic: Literal["max", "mean"] = "max"     # max |x| (released code) or mean |x| (paper's pseudocode)
    learn: bool = True                            # False: the mask and initial scales only (ablation)
    epochs: int = Field(5, ge=0)                  # paper: 20 (× 128 samples at batch 1)
    # samples per optimizer step; the calibration batches are cut into micro-batches of this size (paper: 1)
    batch_size: int = Field(1, ge=1)
    lr_alpha: float = Field(5e-4, gt=0)
    lr_scales: float = Field(1e-3, gt=0)           # r1 and r2
    preprocess: Preprocess | None = None


def salient_mask(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """Channels at or above the floor(ratio·IC)-th largest statistic (ties included), bool [IC]."""
    t = a.sort(descending=True).values[int(math.floor(ratio * a.numel()))]
    return a >= t


def row_quant(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row RTN over the whole row, range including 0: (codes, scale fp16-valued, zero)."""
    qmax = 2 ** bits - 1
    lo = W.amin(1).clamp(max=0)
    hi = W.amax(1).clamp(min=0)
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    s = ((hi - lo) / qmax).to(SCALE_DTYPE).float()
    z = torch.round(-lo / s).clamp(0, qmax)
    q = (torch.round(W / s[:, None]) + z[:, None]).clamp(0, qmax)
    return q, s, z


class _Binarized(nn.Module):
    """One Linear's learnable binarization: alpha [OC,1], r1 [OC,1], r2 [1,IC]; everything else frozen."""

    def __init__(self, W: torch.Tensor, mask: torch.Tensor, bits: int):
        super().__init__()
        ns = ~mask
        self.bits = bits
        q, s, z = row_quant(W, bits)
        Wn = W[:, ns]
        mu = Wn.mean(1, keepdim=True) if Wn.numel() else torch.zeros(W.shape[0], 1)
        for k, v in {"mask": mask, "q": q, "s": s, "z": z, "D4": s[:, None] * (q - z[:, None]), "mu": mu,
                     "sign": torch.where(W >= mu, 1.0, -1.0)}.items():     # sign(0) := +1, a true binary code
            self.register_buffer(k, v)
        self.alpha = nn.Parameter(Wn.abs().mean(1, keepdim=True) if Wn.numel() else torch.zeros(W.shape[0], 1))
        self.r1 = nn.Parameter(torch.ones(W.shape[0], 1))
        self.r2 = nn.Parameter(torch.ones(1, W.shape[1]))

    def weight(self) -> torch.Tensor:
        Dn = self.r1 * self.r2 * (self.alpha * self.sign + self.mu)
        return torch.where(self.mask, self.D4, Dn)

    @torch.no_grad()
    def pack(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The stored tensors and the weight they dequantize to (r1 folded into alpha and mu, fp16)."""
        ns = ~self.mask
        alpha = (self.r1 * self.alpha).squeeze(1).to(SCALE_DTYPE)
        mu = (self.r1 * self.mu).squeeze(1).to(SCALE_DTYPE)
        r2 = self.r2[0, ns].to(SCALE_DTYPE)
        bits = self.bits
        half = 2 ** (bits - 1)        # compressed-tensors packs signed codes: store q − 8 for 4 bits
        tensors = {
            "mask": pack_bits(self.mask),
            "signs": pack_bits(self.sign[:, ns] > 0),
            "codes": pack_to_int32((self.q[:, self.mask] - half).to(torch.int8), bits),
            "zero": pack_to_int32((self.z[None, :] - half).to(torch.int8), bits),
            "scale": self.s.to(SCALE_DTYPE),
            "alpha": alpha, "mu": mu, "r2": r2,
        }
        return tensors, dequantize(tensors, tuple(self.sign.shape), bits)


def pack_bits(b: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> uint8 [..., ceil(n/8)], bit j of byte k holds element 8k + j."""
    n = b.shape[-1]
    x = F.pad(b.to(torch.uint8), (0, (-n) % 8)).reshape(*b.shape[:-1], -1, 8)
    return (x << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(x: torch.Tensor, n: int) -> torch.Tensor:
    bits = (x.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(*x.shape[:-1], -1)[..., :n].bool()


def dequantize(t: dict[str, torch.Tensor], shape: tuple[int, int], bits: int) -> torch.Tensor:
    """W[:, sal] = s (q − z); W[:, ns] = r2 ⊙ (alpha·b + mu), b = ±1. fp32 [OC, IC]."""
    OC, IC = shape
    half = 2 ** (bits - 1)
    mask = unpack_bits(t["mask"], IC)
    n_sal = int(mask.sum())
    q = unpack_from_int32(t["codes"], bits, torch.Size([OC, n_sal])).float() + half
    z = unpack_from_int32(t["zero"], bits, torch.Size([1, OC])).float()[0] + half
    b = torch.where(unpack_bits(t["signs"], IC - n_sal), 1.0, -1.0)
    W = torch.empty(OC, IC)
    W[:, mask] = t["scale"].float()[:, None] * (q - z[:, None])
    W[:, ~mask] = t["r2"].float() * (t["alpha"].float()[:, None] * b + t["mu"].float()[:, None])
    return W


def _neg_log_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # cos per token along the hidden dim, averaged over tokens; |.| before the log (spec §Block-wise 4)
    return -torch.log(F.cosine_similarity(a, b, dim=-1).mean().abs().clamp_min(1e-12))


def block_loss(y: torch.Tensor, y_full: torch.Tensor, y_fq: torch.Tensor) -> torch.Tensor:
    """MSE + negative log-cosine against the FP path's output and the FP block's output on the same input."""
    return F.mse_loss(y, y_full) + F.mse_loss(y, y_fq) + _neg_log_cos(y, y_full) + _neg_log_cos(y_fq, y)


@register("ptq161")
class PTQ161(Method):
    Config = PTQ161Config
    scope = "block"
    calibrate_on = "fp"          # act statistics of the full-precision model, as the reference computes them
    needs = ("input_absmax", "input_absmean", "fp_path")

    def apply_block(self, ctx) -> list[Packed]:
        cfg = self.config
        key = "input_absmax" if cfg.statistic == "max" else "input_absmean"
        rel = {name: name[len(ctx.prefix) + 1:] for name in ctx.targets}
        parts = {name: _Binarized(mod.weight.data.float().cpu(), salient_mask(ctx.stats[name][key].cpu(),
                                                                                  cfg.salient_ratio).cpu(),
                                  cfg.salient_bits).to(ctx.device)
                 for name, mod in ctx.targets.items()}
        if cfg.learn and cfg.epochs > 0:
            self._train(ctx, parts, rel)
        out = []
        for name, part in parts.items():
            part = part.cpu()
            tensors, W_hat = part.pack()
            OC, IC = W_hat.shape
            n_sal = int(part.mask.sum())
            out.append(Packed(name=name, method=self.name, tensors=tensors, n_weights=OC * IC, bits=1,
                              layout="ptq161", W_hat=W_hat,
                              meta={"shape": [OC, IC], "salient_bits": cfg.salient_bits, "bits": 1,
                                    "layout": "ptq161", "salient_columns": n_sal},
                              info={"salient_columns": n_sal, "statistic": cfg.statistic,
                                    "learned": cfg.learn and cfg.epochs > 0,
                                    **getattr(self, "preprocess_info", {})}))
        return out

    def _train(self, ctx, parts: dict[str, _Binarized], rel: dict[str, str]) -> None:
        cfg = self.config
        block, dev = ctx.block, ctx.device
        dtype = next(block.parameters()).dtype
        y_fq = ctx.forward()                          # the FP block on the compressed path's inputs
        frozen = [(p, p.requires_grad) for p in block.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        block.float()                                 # train in fp32 on any device (fp16 grads underflow)
        opt = torch.optim.AdamW([
            {"params": [p.alpha for p in parts.values()], "lr": cfg.lr_alpha},
            {"params": [q for p in parts.values() for q in (p.r1, p.r2)], "lr": cfg.lr_scales}],
            weight_decay=0.0)
        # (input, kwargs, FP-path target, FP block on this input) per micro-batch, in a fixed order as OmniQuant's
        size = cfg.batch_size
        batches = [(h, kw, y_full[a:a + size], y_same[a:a + size])
                   for (hb, kwb), y_full, y_same in zip(ctx.inputs, ctx.fp_outputs, y_fq, strict=True)
                   for a, (h, kw) in zip(range(0, hb.shape[0], size), split_batch(hb, kwb, size), strict=True)]
        steps, total = 0, cfg.epochs * len(batches)
        try:
            with torch.enable_grad():
                for _ in range(cfg.epochs):
                    for h, kw, y_full, y_same in batches:
                        weights = {f"{rel[n]}.weight": p.weight() for n, p in parts.items()}
                        y = block_output(functional_call(block, weights, (h.to(dev).float(),),
                                                         to_device(kw, dev)))
                        loss = block_loss(y.float(), y_full.to(dev).float(), y_same.to(dev).float())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        steps += 1
                        if ctx.progress and steps % max(1, total // 10) == 0:
                            ctx.progress({"event": "train", "index": ctx.index, "step": steps, "total": total,
                                          "loss": loss.detach().item()})
        finally:
            block.to(dtype)
            for p, g in frozen:
                p.requires_grad_(g)

    def prepare(self, model, ctx) -> None:
        """Quantization preprocessing: PTQ1.61 once on a copy, a restorative LoRA on top of it, merged, and the
        merged weights become the model this stage then quantizes (its statistics and targets included)."""
        pre = self.config.preprocess
        if pre is None:
            return
        if any(p.is_meta for p in model.parameters()):
            raise CalqError("PTQ1.61 preprocessing fine-tunes a copy of the whole model, which disk offload "
                            "does not hold in memory", "run it with --offload cpu")
        first = copy.deepcopy(model)
        ctx.compress(first, [PTQ161(self.config.model_copy(update={"preprocess": None}))])
        deltas, losses = train_lora(first, ctx.ids, pre.targets, rank=pre.rank, alpha=pre.alpha, lr=pre.lr,
                                    steps=pre.steps, batch_size=pre.batch_size, warmup=pre.warmup,
                                    device=ctx.device, seed=ctx.seed, progress=ctx.progress)
        quantized = dict(first.named_modules())
        prefix, blocks = find_blocks(model)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if name.startswith(prefix + ".") and isinstance(mod, nn.Linear) and \
                        matches(name, mod, self.config.targets) and not matches(name, mod, self.config.ignore):
                    W = quantized[name].weight.data.float().cpu() + deltas.get(name, 0.0)
                    mod.weight.data.copy_(W.to(mod.weight.dtype))
        self.preprocess_info = {"lora_loss_first": losses[0], "lora_loss_last": losses[-1], "lora_steps": len(losses)}
        del first

    def check_shape(self, shape):
        OC, IC = shape
        if IC < 2:
            return "salient_ratio", f"needs at least 2 input channels, got {IC}"
        return None

    @classmethod
    def rebuild(cls, model, name, tensors, meta):
        return {"weight": dequantize(tensors, tuple(meta["shape"]), meta["salient_bits"])}
