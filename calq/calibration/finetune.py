"""Causal-LM fine-tuning of LoRA side paths on a frozen model (PTQ1.61's restorative LoRA, §3.4).

The LoRA is a forward hook adding `scale·(x Aᵀ) Bᵀ` to each target Linear, as in PEFT (A Kaiming-uniform,
B zero, scale = alpha / rank), so nothing of the model's own modules changes and merging is `W + scale·B A`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from calq.calibration.blocks import matches


def train_lora(model: nn.Module, ids: torch.Tensor, targets: list[str], *, rank: int, alpha: float, lr: float,
               steps: int, batch_size: int, warmup: float, device, seed: int,
               progress=None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train LoRA on `targets` over token windows `ids` [N, T].

    Returns each target's merged delta scale·B A (fp32, CPU) and the loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    model.to(device, torch.float32).train()
    for p in model.parameters():
        p.requires_grad_(False)
    scale = alpha / rank
    loras: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name and matches(name, mod, targets):
            bound = 1 / math.sqrt(mod.in_features)      # kaiming_uniform_(a=√5), PEFT's default init of A
            A = nn.Parameter(torch.empty(rank, mod.in_features).uniform_(-bound, bound, generator=gen).to(device))
            B = nn.Parameter(torch.zeros(mod.out_features, rank, device=device))
            loras[name] = (A, B)
            handles.append(mod.register_forward_hook(
                lambda _m, args, out, A=A, B=B: out + scale * ((args[0] @ A.t()) @ B.t())))
    if not loras:
        raise ValueError(f"no Linear matches the LoRA targets {targets}")
    opt = torch.optim.AdamW([p for ab in loras.values() for p in ab], lr=lr, weight_decay=0.0)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    order = torch.randperm(ids.shape[0], generator=gen)
    losses = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                pick = order[(step * batch_size + torch.arange(batch_size)) % ids.shape[0]]
                batch = ids[pick].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss))
                if progress and (step + 1) % max(1, steps // 10) == 0:
                    progress({"event": "lora", "step": step + 1, "total": steps, "loss": losses[-1]})
    finally:
        for h in handles:
            h.remove()
        model.eval()
    return {name: (scale * B @ A).detach().cpu() for name, (A, B) in loras.items()}, losses
