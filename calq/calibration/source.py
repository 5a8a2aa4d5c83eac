"""Where a run's weights rest: the whole model in RAM, or on disk, read and written one block at a time.

`ModelSource` owns what differs between the two: loading, scoring the dense model, the engine's onload/offload
hooks, writing the checkpoint and scoring it read back. `compress` is the same sequence of phases for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from calq.calibration.experts import CheckpointNames
from calq.calibration.loading import check_causal_lm, load_model, load_tokenizer, quiet_transformers, source_info
from calq.calibration.offload import DiskBlocks, empty_model, streamed_window_losses
from calq.errors import ModelError
from calq.eval.perplexity import perplexity
from calq.methods.base import Packed
from calq.zoo import resolve_model

Scorer = Callable[[torch.Tensor, int], float]       # (windows, batch size) -> perplexity


def compute_dtype(device: torch.device, store_dtype: torch.dtype) -> torch.dtype:
    # CPUs have no fast fp16 matmul and bf16 loses too much for Hessians' inputs: fp32. Accelerators: as stored.
    return torch.float32 if device.type == "cpu" else store_dtype


def load_disk(ref: str, dtype: torch.dtype | None = None, with_tokenizer: bool = True):
    """(meta-device model with all but its blocks read, its DiskBlocks, tokenizer or None) for disk offload.

    dtype None keeps the checkpoint's own, as load_model(dtype=None) does."""
    from calq.export.reader import CheckpointReader, dense_config, tied_output_key

    quiet_transformers()
    path = Path(resolve_model(ref))
    config, _ = dense_config(path)
    check_causal_lm(config.to_dict(), ref)
    reader = CheckpointReader(path)
    dtype = dtype or getattr(config, "dtype", None) or reader.first_dtype()
    model = empty_model(config, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    names, tied = reader.names(model), tied_output_key(model)      # the hub's names: fused experts per expert
    keys = set(names.to_checkpoint(names.unfuse({k: v for k, v in model.state_dict().items() if k != tied})))
    if keys != set(reader.files) and reader.qconfig is None:    # a calq checkpoint stores packed names
        missing, extra = sorted(keys - set(reader.files)), sorted(set(reader.files) - keys)
        if not extra:
            raise ModelError(f"{ref} lacks {len(missing)} weights the architecture needs, e.g. "
                             f"{', '.join(missing[:3])}", "the model files are incomplete; download the model again")
        raise ModelError(f"disk offload needs the checkpoint's tensor names to be the model's; {ref} differs "
                         f"({', '.join((missing + extra)[:3])})",
                         "use --offload cpu (transformers renames them while loading)")
    disk = DiskBlocks(model, reader.read_into)
    disk.load_rest()
    tokenizer = load_tokenizer(path, ref) if with_tokenizer else None
    return model, disk, tokenizer


def streamed_ppl(disk: DiskBlocks, device, dtype: torch.dtype) -> Scorer:
    def score(windows: torch.Tensor, batch_size: int) -> float:
        losses = streamed_window_losses(disk, list(windows.split(batch_size)), device, dtype)
        return math.exp(torch.cat(losses).mean().item())
    return score


def in_ram_ppl(model, device) -> Scorer:
    return lambda windows, batch_size: perplexity(model, windows, batch_size=batch_size, device=device)


class ModelSource:
    """A model for one compress run, in RAM (mode "cpu") or streamed from its safetensors files (mode "disk")."""

    def __init__(self, ref: str, mode: str, allow_pickle: bool = False):
        self.ref, self.mode, self.writer = ref, mode, None
        if mode == "disk":
            self.model, self.disk, self.tokenizer = load_disk(ref)
        else:
            self.model, self.tokenizer, _ = load_model(ref, dtype=None, allow_pickle=allow_pickle)
            self.disk = None
        self.store_dtype = next(p for p in self.model.parameters() if not p.is_meta).dtype
        self.info = source_info(ref)            # file, format, sha256 of a GGUF source, for the report

    @contextmanager
    def dense_scorer(self, device) -> Iterator[Scorer]:
        dtype = compute_dtype(device, self.store_dtype)
        if self.disk is not None:
            yield streamed_ppl(self.disk, device, dtype)
            return
        self.model.to(device, dtype)
        try:
            yield in_ram_ppl(self.model, device)
        finally:
            self.model.to("cpu", self.store_dtype)

    def engine_hooks(self, out: Path | None) -> dict:
        """The engine's onload/offload hooks: in disk mode each finished block is written to out as its shard
        (out None: dropped unwritten, on the ranks of a distributed run that do not write)."""
        if self.disk is None:
            return {}
        from calq.export.writer import ShardedWriter

        if out is not None:
            self.writer = ShardedWriter(out, len(self.disk.blocks) + 1, self.store_dtype, CheckpointNames(self.model))
        return {"onload": self.disk.onload, "offload": _write_block(self.disk, self.writer)}

    def write(self, records: list, out: Path, ignore: list[str]) -> dict:
        """Write the compressed model's checkpoint to out; the writer's stats plus every Linear's dense size."""
        from calq.export.writer import write_checkpoint

        model = self.model.to(self.store_dtype)
        stats = self.writer.finish(model, records, ignore) if self.writer else \
            write_checkpoint(model, records, out, ignore)
        stats["dense_sizes"] = {n: m.weight.numel() for n, m in model.named_modules()
                                if isinstance(m, torch.nn.Linear)}
        stats["dense_sizes"].update({n: oc * ic for n, (oc, ic) in CheckpointNames(model).expert_shapes().items()})
        return stats

    def release(self) -> None:
        """Drop the model before the checkpoint is read back (RAM holds one copy at a time)."""
        self.model = self.disk = self.writer = None

    @contextmanager
    def reloaded_scorer(self, out: Path, device, wrap=None) -> Iterator[Scorer]:
        """Score the checkpoint in out as read back from disk, in fp32 (streamed in disk mode); wrap(model, out),
        if given, is a context manager applied around scoring in RAM (the checkpoint's KV cache)."""
        from contextlib import nullcontext

        from calq.export.reader import load_checkpoint

        if self.mode == "disk":
            _, disk, _ = load_disk(str(out), torch.float32, with_tokenizer=False)
            yield streamed_ppl(disk, device, torch.float32)
            return
        reloaded = load_checkpoint(out, dtype=torch.float32).to(device)
        with (wrap(reloaded, out) if wrap else nullcontext()):
            yield in_ram_ppl(reloaded, device)


def _write_block(disk: DiskBlocks, writer):
    """The engine's offload hook in disk mode: write block i as its own shard (unless writer is None), then drop
    its tensors."""
    def offload(i: int, block, result) -> None:
        name = f"{disk.prefix}.{i}."
        records = [m.record for m in result.modules if m.record.name.startswith(name)]
        if writer is not None:
            writer.add({name + k: v for k, v in block.state_dict().items()}, records)
        for rec in records:     # shapes stay for the report and quantization_config; the data is on disk
            if isinstance(rec, Packed):
                rec.tensors = {k: v.to("meta") for k, v in rec.tensors.items()}
                continue
            rec.codes, rec.scale = rec.codes.to("meta"), rec.scale.to("meta")
            rec.zero = None if rec.zero is None else rec.zero.to("meta")
        disk.release(i, block)
    return offload
