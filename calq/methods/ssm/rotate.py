"""Quamba2's exact model-level transforms: fold RMSNorm weights into the next Linear, rotate the residual stream.

quamba.md "Quamba2: extra steps" 1–2. With γ folded (W_in ← W_in·diag(γ), γ := 1) every RMSNorm is
rotation-invariant (‖x·Hᵀ‖ = ‖x‖, no mean term), so the whole residual stream can live in the rotated basis:
E ← E·Hᵀ, W_in ← W_in·Hᵀ, W_out ← H·W_out, W_lm ← W_lm·Hᵀ. The logits do not change (tested in fp32).
The embedding is untied from lm_head first, since the two now differ.
"""

from __future__ import annotations

import torch
from torch import nn

from calq.errors import ModelError
from calq.methods.ssm.hadamard import hadamard


def _backbone(model):
    bb = getattr(model, "backbone", None)
    if bb is None or not hasattr(bb, "norm_f") or not hasattr(model, "lm_head"):
        raise ModelError(f"{type(model).__name__} is not a Mamba/Mamba2 causal LM (backbone.norm_f, lm_head)",
                         "quamba2 runs on MambaForCausalLM and Mamba2ForCausalLM")
    return bb


@torch.no_grad()
def untie_lm_head(model) -> None:
    if model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


@torch.no_grad()
def fold_norms(model) -> None:
    """γ of each block's norm into its in_proj columns, γ of norm_f into lm_head; all γ become 1."""
    bb = _backbone(model)
    untie_lm_head(model)
    pairs = [(b.norm, b.mixer.in_proj) for b in bb.layers] + [(bb.norm_f, model.lm_head)]
    for norm, lin in pairs:
        W = lin.weight.data
        lin.weight.data.copy_((W.double() * norm.weight.double()[None, :]).to(W.dtype))
        norm.weight.data.fill_(1.0)


@torch.no_grad()
def rotate_residual(model) -> dict:
    """The residual-stream Hadamard H_d; norms must already be folded. Returns its metadata."""
    bb = _backbone(model)
    H = hadamard(model.config.hidden_size)
    for norm in [b.norm for b in bb.layers] + [bb.norm_f]:
        if not torch.all(norm.weight == 1):
            raise ValueError("rotate_residual needs folded norms (γ = 1): call fold_norms first")
    emb = model.get_input_embeddings().weight
    emb.data.copy_(H.rotate_input(emb.data))                              # E·Hᵀ (rows are token vectors)
    for b in bb.layers:
        b.mixer.in_proj.weight.data.copy_(H.rotate_input(b.mixer.in_proj.weight.data))
        b.mixer.out_proj.weight.data.copy_(H.rotate_output(b.mixer.out_proj.weight.data))
    model.lm_head.weight.data.copy_(H.rotate_input(model.lm_head.weight.data))
    return H.meta()
