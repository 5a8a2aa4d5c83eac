"""Peak memory of a compress run: predicted from the model and recipe before any work, measured by phase.

The prediction adds what the run holds at its worst moment on the host (CPU compute; on an accelerator the block,
Hessians and evaluation chunk live there instead):
  weights      the model as loaded (in RAM mode; with disk offload only what sits outside the blocks)
  activations  the calibration hidden states of every sample, once per stream (engine: outputs replace inputs);
               a rank of a distributed run holds its share, unless a block-scope stage gathers the whole set
  block        the largest block upcast to the compute dtype, plus the copy of its weights before any stage
  hessians     per Linear of the largest block IC² fp32, times 3: H, the inverse factor, one transient copy
               (per shared input, the fp64 sum while calibrating takes two of those three)
  evaluation   one batch of hidden states and MLP activations, plus two chunks of fp32 logits
"""

from __future__ import annotations

import torch
from torch import nn

from calq.calibration.blocks import find_blocks, find_linears
from calq.errors import CalqError
from calq.eval.perplexity import LOGIT_CHUNK_BYTES
from calq.methods import METHODS

PARTS = ("weights", "activations", "block", "hessians", "evaluation")


def _bytes(t: torch.Tensor) -> int:
    return 0 if t.is_meta else t.numel() * t.element_size()


def plan(recipe, model: nn.Module, compute_dtype: torch.dtype, evaluate: bool, ranks: int = 1) -> dict[str, int]:
    """Predicted bytes per part (PARTS) for this recipe on this model, on one of `ranks` processes."""
    cal, ev = recipe.calibration, recipe.evaluation
    stages = [METHODS[s.method](s) for s in recipe.stages]
    prefix, blocks = find_blocks(model)
    hidden = model.get_input_embeddings().embedding_dim
    width = torch.finfo(compute_dtype).bits // 8
    streams = 0
    if not all(m.data_free for m in stages):
        streams = 4 if any("fp_path" in m.needs for m in stages) else 1 + (cal.propagate == "fp")
    tokens = cal.num_samples * cal.seq_len * streams
    tokens += sum((s.calibration.num_samples or cal.num_samples) * (s.calibration.seq_len or cal.seq_len)
                  for s in recipe.stages if s.calibration is not None)
    if not any(m.scope == "block" for m in stages):
        tokens = -(-tokens // ranks)
    biggest = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    linears = find_linears(biggest, prefix).values()
    block = sum(p.numel() for p in biggest.parameters()) * width + sum(m.weight.numel() * 4 for m in linears)
    intermediate = max((m.out_features for m in linears), default=hidden)
    evaluation = 0
    if evaluate:
        tokens_per_batch = ev.batch_size * ev.seq_len
        vocab = model.get_input_embeddings().num_embeddings
        evaluation = tokens_per_batch * (3 * hidden + 2 * intermediate) * 4 + \
            2 * min(LOGIT_CHUNK_BYTES, tokens_per_batch * vocab * 4)
    return {"weights": sum(_bytes(p) for p in model.parameters()) + sum(_bytes(b) for b in model.buffers()),
            "activations": tokens * hidden * width,
            "block": block,
            "hessians": 0 if streams == 0 else sum(3 * 4 * m.in_features ** 2 for m in linears),
            "evaluation": evaluation}


def check(need: dict[str, int], available: int) -> None:
    """One-line error naming the parts when what the run still has to allocate exceeds the available RAM
    (the weights are loaded already: `available` is what is left after them)."""
    rest = {k: v for k, v in need.items() if k != "weights"}
    total = sum(rest.values())
    if total > available:
        parts = ", ".join(f"{k} {size(v)}" for k, v in rest.items() if v)
        raise CalqError(f"this run needs about {size(total)} beyond the loaded weights ({parts}), but only "
                        f"{size(available)} of RAM is available",
                        "use fewer --num-samples or a shorter --seq-len (activations), a smaller evaluation "
                        "batch_size, or --no-eval")


def size(n: int) -> str:
    for unit, b in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= b:
            return f"{n / b:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"
