"""Perplexity with the GPTQ-paper protocol (formats.md §5).

Text joined once, tokenized once, cut into non-overlapping windows of seq_len (tail dropped, no per-window
BOS), fp32 loss over the predicted tokens of each window, ppl = exp(mean window loss).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F


def window_loss(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each window in fp32, on CPU. ids [b, T], logits [b, T, V] -> [b]."""
    ids = ids.to(logits.device)
    loss = F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return loss.view(ids.shape[0], -1).mean(1).cpu()


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu",
                  on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Mean next-token loss of each window, in fp32. windows: [W, T] -> [W]."""
    losses = []
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(device)
        losses.append(window_loss(ids, model(input_ids=ids, use_cache=False).logits))
        if on_batch:
            on_batch(min(i + batch_size, windows.shape[0]), windows.shape[0])
    return torch.cat(losses)


def perplexity(model, windows: torch.Tensor, **kw) -> float:
    return math.exp(window_losses(model, windows, **kw).mean().item())


def unigram_perplexity(train_ids: list[int] | torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on train_ids, scored like `perplexity`.

    The baseline a trained model must beat: it knows token frequencies and nothing of context.
    """
    counts = Counter(train_ids.tolist() if isinstance(train_ids, torch.Tensor) else train_ids)
    freq = torch.ones(vocab_size, dtype=torch.float64)
    for tok, c in counts.items():
        freq[tok] += c
    logp = freq.log() - freq.sum().log()
    targets = windows[:, 1:]                         # the same predicted tokens as window_losses
    return math.exp(-logp[targets].mean().item())


@torch.no_grad()
def next_token_logprobs(model, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu"):
    """fp32 log-probabilities of every predicted position, per batch of windows: [[b, T-1, V], ...] on CPU."""
    return [model(input_ids=windows[i:i + batch_size].to(device), use_cache=False).logits[:, :-1].float()
            .log_softmax(-1).cpu() for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def kl_to_reference(model, windows: torch.Tensor, reference, batch_size: int = 8,
                    device: str | torch.device = "cpu") -> float:
    """Mean KL(reference ‖ model) per predicted token, in nats. reference: `next_token_logprobs` of the
    reference model on the same windows and batch size, or the reference model itself (run batch by batch).

    The fidelity a compression keeps: unlike perplexity it cannot improve when two errors happen to cancel.
    """
    total, n = 0.0, 0
    for j, i in enumerate(range(0, windows.shape[0], batch_size)):
        ids = windows[i:i + batch_size].to(device)
        if isinstance(reference, list):
            ref = reference[j]
        else:
            ref = reference(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1).cpu()
        lp = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1).cpu()
        if lp.shape[-1] != ref.shape[-1]:
            raise ValueError(f"the reference predicts {ref.shape[-1]} tokens, the model {lp.shape[-1]}")
        if lp.shape != ref.shape:
            raise ValueError("the reference log-probabilities were computed on other windows or batch size")
        total += (ref.exp() * (ref - lp)).sum().item()
        n += ref.shape[0] * ref.shape[1]
    if isinstance(reference, list) and j + 1 != len(reference):
        raise ValueError("the reference log-probabilities were computed on other windows or batch size")
    return total / n
