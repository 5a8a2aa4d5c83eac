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

# fp32 logits held at once while scoring: tokens per chunk = this / (4 · vocab). At a 152k vocabulary and
# seq_len 2048 a batch of 8 windows would otherwise hold 10 GB of logits, and log_softmax as much again.
LOGIT_CHUNK_BYTES = 1 << 28


class Head:
    """Scores hidden states through a causal LM's output head a chunk of tokens at a time, in fp32.

    `hidden(ids)` runs the model up to its final norm (`model.base_model`); the head is
    `get_output_embeddings()`. Some architectures transform logits after the head (soft-capping, scaling):
    a probe on a few tokens compares this path with the model's own logits once, and where they differ every
    batch falls back to the full logits (`chunked` is False).
    """

    def __init__(self, model, probe_ids: torch.Tensor | None = None):
        self.model = model
        self.head = model.get_output_embeddings()
        self.chunked = self.head is not None and hasattr(model, "base_model") and model.base_model is not model
        if self.chunked and probe_ids is not None:
            self.chunked = self._agrees(probe_ids[:1, :16])

    @torch.no_grad()
    def _agrees(self, ids: torch.Tensor) -> bool:
        full = self.model(input_ids=ids, use_cache=False).logits.float()
        ours = self.head(self.hidden(ids)).float()
        return full.shape == ours.shape and bool(torch.allclose(full, ours, rtol=1e-4, atol=1e-4 * full.abs().max()))

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state

    def chunk_tokens(self) -> int:
        return max(16, LOGIT_CHUNK_BYTES // (4 * self.head.weight.shape[0]))

    def log_probs(self, hidden: torch.Tensor):
        """fp32 next-token log-probabilities of the predicting positions of hidden [b, T, D], chunk by chunk:
        yields (slice into the b·(T-1) flattened positions, log-probs [n, V])."""
        h = hidden[:, :-1].flatten(0, 1)                     # [b·(T-1), D]
        c = self.chunk_tokens()
        for a in range(0, h.shape[0], c):
            yield slice(a, a + c), self.head(h[a:a + c]).float().log_softmax(-1)


def window_loss(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each window in fp32, on CPU. ids [b, T], logits [b, T, V] -> [b]."""
    ids = ids.to(logits.device)
    loss = F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return loss.view(ids.shape[0], -1).mean(1).cpu()


def hidden_window_loss(head: Head, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`window_loss` from final hidden states [b, T, D], a chunk of tokens through the head at a time."""
    targets = ids[:, 1:].flatten().to(hidden.device)
    nll = torch.empty(targets.shape[0], device=hidden.device)
    for sl, lp in head.log_probs(hidden):
        nll[sl] = -lp.gather(1, targets[sl, None])[:, 0]
    return nll.view(ids.shape[0], -1).mean(1).cpu()


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu",
                  on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Mean next-token loss of each window, in fp32. windows: [W, T] -> [W]. Peak memory holds one chunk of
    logits (`LOGIT_CHUNK_BYTES`), not [batch, T, vocab]."""
    head = Head(model, windows[:1].to(device))
    losses = []
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(device)
        if head.chunked:
            losses.append(hidden_window_loss(head, ids, head.hidden(ids)))
        else:
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
    reference model on the same windows and batch size, or the reference model itself, run alongside batch by
    batch and scored a chunk of tokens at a time (nothing of it is kept between batches).

    The fidelity a compression keeps: unlike perplexity it cannot improve when two errors happen to cancel.
    """
    if not isinstance(reference, list):
        return _streamed_kl(model, windows, reference, batch_size, device)
    total, n = 0.0, 0
    for j, i in enumerate(range(0, windows.shape[0], batch_size)):
        ids = windows[i:i + batch_size].to(device)
        ref = reference[j]
        lp = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1).cpu()
        if lp.shape[-1] != ref.shape[-1]:
            raise ValueError(f"the reference predicts {ref.shape[-1]} tokens, the model {lp.shape[-1]}")
        if lp.shape != ref.shape:
            raise ValueError("the reference log-probabilities were computed on other windows or batch size")
        total += (ref.exp() * (ref - lp)).sum().item()
        n += ref.shape[0] * ref.shape[1]
    if j + 1 != len(reference):
        raise ValueError("the reference log-probabilities were computed on other windows or batch size")
    return total / n


def _streamed_kl(model, windows, reference, batch_size, device) -> float:
    probe = windows[:1].to(device)
    ours, theirs = Head(model, probe), Head(reference, probe)
    if ours.chunked and theirs.chunked and ours.head.weight.shape[0] != theirs.head.weight.shape[0]:
        raise ValueError(f"the reference predicts {theirs.head.weight.shape[0]} tokens, "
                         f"the model {ours.head.weight.shape[0]}")
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(device)
        if ours.chunked and theirs.chunked:
            pairs = zip(ours.log_probs(ours.hidden(ids)), theirs.log_probs(theirs.hidden(ids)), strict=True)
            for (_, lp), (_, ref) in pairs:
                total += (ref.exp() * (ref - lp)).sum().item()
                n += ref.shape[0]
            continue
        lp = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        ref = reference(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        if lp.shape[-1] != ref.shape[-1]:
            raise ValueError(f"the reference predicts {ref.shape[-1]} tokens, the model {lp.shape[-1]}")
        total += (ref.exp() * (ref - lp)).sum().item()
        n += ref.shape[0] * ref.shape[1]
    return total / n
