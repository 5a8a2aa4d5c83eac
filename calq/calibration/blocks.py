"""Find the repeated blocks and their Linears by walking the module tree, and capture block-0 inputs.

No per-architecture tables and no torch.fx: the repeated block list is the ModuleList of identical
classes holding the most parameters (Llama/Mistral/Qwen2 `model.layers`, OPT `model.decoder.layers`,
GPT-2 `transformer.h`, Mamba `backbone.layers`). Block inputs are caught by a pre-hook on block 0 that
stops the forward, so everything before it (embeddings, rotary tables, masks) runs as the model wrote it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from calq.errors import ModelError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[2]:
                best = (name, mod, n)
    if best is None:
        raise ModelError(f"{type(model).__name__} has no list of repeated blocks",
                         "calq supports decoder-only models whose layers sit in an nn.ModuleList")
    return best[0], best[1]


def find_linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    out = {}
    for name, mod in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(mod, nn.Linear):
            out[full] = mod
        elif type(mod).__name__ == "Conv1D":  # GPT-2 stores W transposed; not wired up yet
            raise ModelError(f"{full} is a GPT-2 style Conv1D, which calq cannot quantize yet",
                             "use a model built from nn.Linear (Llama, Mistral, Qwen2, OPT, Phi3, Mamba)")
    return out


def matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """llm-compressor matching: a class name, an exact module path, or `re:` + a regex (re.match)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or p == type(module).__name__ or name.endswith("." + p) and "." not in p:
            return True
    return False


def move_outside_blocks(module: nn.Module, blocks: nn.ModuleList, device, dtype) -> None:
    """Move every submodule except the block list (embeddings, norms, rotary tables, lm_head)."""
    for child in module.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            move_outside_blocks(child, blocks, device, dtype)
        else:
            child.to(device, dtype)


class _Stop(Exception):
    pass


def to_device(obj, device):
    """Move tensors inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block0: nn.Module, batches: list[torch.Tensor], device):
    """(hidden_states, kwargs) that block 0 receives for each batch of token ids; kept on CPU."""
    caught = []

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                                "cache_params", "use_cache")}
        caught.append((hidden.cpu(), to_device(kwargs, "cpu")))
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(caught) != len(batches):
        raise ModelError("the first block was not reached by the model's forward",
                         "this architecture routes inputs in a way calq does not support yet")
    return caught


def split_batch(hidden: torch.Tensor, kwargs: dict, size: int) -> list[tuple[torch.Tensor, dict]]:
    """A calibration batch as micro-batches of `size` samples: the hidden states [B, T, D] and every kwarg tensor
    whose first dim is B are sliced; the rest (rotary tables [1, T, d], masks broadcast over B) are shared."""
    B = hidden.shape[0]

    def cut(obj, a, b):
        if isinstance(obj, torch.Tensor):
            return obj[a:b] if obj.dim() and obj.shape[0] == B and B > 1 else obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(cut(o, a, b) for o in obj)
        if isinstance(obj, dict):
            return {k: cut(v, a, b) for k, v in obj.items()}
        return obj

    return [(hidden[a:a + size], cut(kwargs, a, a + size)) for a in range(0, B, size)]


def block_output(out):
    """Hidden states from a block's return value (a tensor, or a tuple whose first item is one)."""
    return out[0] if isinstance(out, (tuple, list)) else out
