"""Where block weights rest between blocks: CPU RAM, or the safetensors files on disk (disk offload).

In disk mode the model is built on the meta device; only the modules outside the blocks (embeddings, final
norm, lm_head, rotary tables) are read into RAM. `DiskBlocks` fills block i from the files just before it runs
and sends it back to meta afterwards, so RAM holds one block's weights at a time (issue #3). The files are read
through a `read_into(model, keep, assign=True)` callable (`export.reader.CheckpointReader.read_into`), so the
same code streams a dense source model and a written calq checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from calq.calibration.blocks import block_output, capture_block_inputs, find_blocks, move_outside_blocks, to_device
from calq.errors import CalqError

MODES = ("auto", "cpu", "disk")
# auto picks disk when the weights exceed this share of available RAM: the in-RAM path also holds one fp32
# block, the calibration activations and, while writing, the stored copy of each tensor.
RAM_FRACTION = 0.5


def available_ram() -> int:
    """Bytes of RAM available to a new allocation (MemAvailable), from psutil or /proc/meminfo."""
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):      # e.g. macOS without psutil: no such sysconf name
        return UNKNOWN_RAM


UNKNOWN_RAM = 1 << 62   # what available_ram says when nothing can measure it: plenty, so nothing is refused


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def choose_offload(mode: str, path: str | Path) -> str:
    """"cpu" or "disk" for an offload mode and a resolved model path (a local folder or a hub id)."""
    if mode not in MODES:
        raise CalqError(f"unknown offload mode {mode!r}", "use auto, cpu or disk")
    local = Path(path).is_dir() and any(Path(path).glob("*.safetensors"))
    if mode == "disk" and str(path).lower().endswith(".gguf"):
        raise CalqError(f"disk offload reads safetensors folders; {path} is a GGUF file",
                        "use --offload cpu (transformers dequantizes a GGUF file in RAM)")
    if mode == "disk" and not local:
        raise CalqError(f"disk offload reads safetensors files from a local folder; {path} is not one",
                        "download the model first (hf download ID --local-dir DIR) and pass --model DIR")
    if mode != "auto":
        return mode
    return "disk" if local and weights_bytes(path) > RAM_FRACTION * available_ram() else "cpu"


def empty_model(config, dtype: torch.dtype):
    """The architecture with every parameter on the meta device; buffers (rotary tables) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()     # accelerate's meta parameters come untied from the constructor
    return model.eval()


def is_loaded(block: nn.Module) -> bool:
    return any(not p.is_meta for p in block.parameters())


class DiskBlocks:
    """The blocks of a meta-device model, each read from the files when it is needed and dropped after."""

    def __init__(self, model: nn.Module, read_into: Callable):
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        self.read_into = read_into

    def load_rest(self) -> None:
        """Read everything outside the blocks."""
        self.read_into(self.model, lambda k: not k.startswith(f"{self.prefix}."), assign=True)

    def onload(self, i: int, block: nn.Module, *_) -> None:
        self.read_into(self.model, lambda k: k.startswith(f"{self.prefix}.{i}."), assign=True)

    def release(self, i: int, block: nn.Module, *_) -> None:
        """Back to meta: parameters and persistent buffers (the files hold them); other buffers stay."""
        for mod in block.modules():
            for n, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[n] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            for n, b in mod._buffers.items():
                if b is not None and n not in mod._non_persistent_buffers_set:
                    mod._buffers[n] = b.to("meta")

    def loaded(self) -> int:
        """How many blocks hold real weights now."""
        return sum(is_loaded(b) for b in self.blocks)


@torch.no_grad()
def streamed_window_losses(disk: DiskBlocks, batches: list[torch.Tensor], device, dtype: torch.dtype) -> list:
    """Mean next-token loss of each window (`eval.perplexity.window_losses`), per batch of token ids, running the
    model block by block over all batches.

    Each block is read once for the whole evaluation set (not once per batch, as a per-forward offload hook
    would do); the hidden states of every batch rest on CPU in between. The model's own forward then runs
    once more per batch with each block answering its precomputed output, so the head (final norm, lm_head,
    anything the architecture does after the blocks) is the model's code, unchanged, scored a chunk of tokens
    at a time as in RAM.
    """
    from calq.eval.perplexity import Head, hidden_window_loss, window_loss

    model, blocks = disk.model, disk.blocks
    rest_dtype = next(p for p in model.parameters() if not p.is_meta).dtype
    move_outside_blocks(model, blocks, device, dtype)
    try:
        inputs = capture_block_inputs(model, blocks[0], batches, device)
        raw = None
        for i, block in enumerate(blocks):
            disk.onload(i, block)
            block.to(device, dtype)
            for j, (hidden, kwargs) in enumerate(inputs):
                raw = block(hidden.to(device), **to_device(kwargs, device))
                inputs[j] = (block_output(raw).cpu(), kwargs)
            disk.release(i, block)
        out, head = [], None
        for ids, (hidden, _) in zip(batches, inputs, strict=True):
            ids, hidden = ids.to(device), hidden.to(device)
            if head is None:
                with _answering(blocks, hidden[:1, :16], raw):
                    head = Head(model, ids[:1, :16])
            with _answering(blocks, hidden, raw):
                out.append(hidden_window_loss(head, ids, head.hidden(ids)) if head.chunked else
                           window_loss(ids, model(input_ids=ids, use_cache=False).logits))
        return out
    finally:
        move_outside_blocks(model, blocks, "cpu", rest_dtype)


class _answering:
    """Every block returns `hidden`, shaped like the block's real return value `like` (tensor or tuple)."""

    def __init__(self, blocks: nn.ModuleList, hidden: torch.Tensor, like):
        self.blocks, self.hidden = blocks, hidden
        self.tail = (None,) * (len(like) - 1) if isinstance(like, (tuple, list)) else None

    def _forward(self, *args, **kwargs):
        return self.hidden if self.tail is None else (self.hidden, *self.tail)

    def __enter__(self):
        for b in self.blocks:
            b.forward = self._forward       # an instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc):
        for b in self.blocks:
            del b.forward
