"""Write a compressed-tensors checkpoint: safetensors + `config.json` (formats.md §1.1, §1.2, §1.5).

Every tensor of the model's state dict is stored in the model's dtype, except that each quantized module's
`weight` becomes its CT tensors. `write_checkpoint` writes one `model.safetensors` from a model held in RAM;
`ShardedWriter` writes the same tensors a block at a time (disk offload), as shards listed in
`model.safetensors.index.json` (formats.md §1.2). The caller owns the folder (`staging.staged`).
`Packed` records (calq's own storage) make the checkpoint calq-only: quant_method "calq", their meta under
`quantization_config.calq_modules`, and any compressed-tensors modules described by the usual groups.
A model with fused MoE experts is stored under its hub checkpoint's names, one tensor per expert and projection
(calibration/experts.py): what transformers and vLLM load.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from calq.calibration.experts import CheckpointNames
from calq.export.ct import ct_quantization_config, ct_tensors
from calq.methods.base import Compressed, Packed


def tied_output_key(model) -> str | None:
    """State-dict key of the output embedding when it shares its tensor with the input embedding."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    return next(f"{name}.weight" for name, m in model.named_modules() if m is out)


def _stored(state: dict[str, torch.Tensor], records: list[Compressed | Packed], dtype: torch.dtype,
            tied: str | None, names: CheckpointNames):
    """(tensors as stored, their dense bytes, per-module byte counts, sizes) for part of a state dict. sizes: per
    model-space key (fused experts split), [bytes stored, parameters it holds, dims, whether a record replaced it]:
    what bits per parameter and the untouched-weights warning are computed from."""
    state = names.unfuse(state)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    dense_bytes = sum(t.nbytes for t in tensors.values())
    sizes = {k: [t.nbytes, t.numel(), t.dim(), False] for k, t in tensors.items()}
    modules = {}
    for rec in [r for r in records if isinstance(r, Packed)]:
        prefix = f"{rec.name}."
        keys = [k for k in tensors if k.startswith(prefix)] if rec.replaces is None else \
            [prefix + k for k in rec.replaces]
        if not keys or any(k not in tensors for k in keys):
            raise ValueError(f"record {rec.name!r} replaces {keys}, which are not all in the model's state dict")
        dense = sum(tensors.pop(k).nbytes for k in keys)
        tensors.update({prefix + k: v.contiguous() for k, v in rec.tensors.items()})
        nbytes = sum(v.nbytes for v in rec.tensors.values())
        for j, k in enumerate(keys):
            sizes[k][0], sizes[k][3] = (nbytes if j == 0 else 0), True
        modules[rec.name] = {"bytes": nbytes, "dense_bytes": dense, "bits_per_weight": 8 * nbytes / rec.n_weights}
    for rec in [r for r in records if not isinstance(r, Packed)]:
        key = f"{rec.name}.weight"
        if key not in tensors:
            hint = " (it is tied to the input embedding)" if key == tied else ""
            raise ValueError(f"record {rec.name!r} names no weight in the model's state dict{hint}")
        W = tensors.pop(key)
        if tuple(W.shape) != tuple(rec.codes.shape):
            raise ValueError(f"{rec.name}: weight shape {tuple(W.shape)} != codes {tuple(rec.codes.shape)}")
        ct = ct_tensors(rec, dtype)
        tensors.update({f"{rec.name}.{k}": v for k, v in ct.items()})
        nbytes = sum(v.nbytes for v in ct.values())
        modules[rec.name] = {"bytes": nbytes, "dense_bytes": W.nbytes, "bits_per_weight": 8 * nbytes / W.numel()}
        sizes[key][0], sizes[key][3] = nbytes, True
    return names.to_checkpoint(tensors), dense_bytes, modules, sizes


def _write_config(model, records: list[Compressed | Packed], ignore: list[str], out_dir: Path,
                  names: CheckpointNames) -> None:
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config.pop("quantization_config", None)
    ct = [replace(r, name=names.hub_name(r.name)) for r in records if not isinstance(r, Packed)]
    if ct:
        experts = {names.hub_name(n) for n in names.expert_shapes()}
        config["quantization_config"] = ct_quantization_config(ct, ignore, experts)
    calq_modules = {names.hub_name(r.name): {"method": r.method, "tensors": sorted(r.tensors), "n_weights": r.n_weights,
                             "replaces": None if r.replaces is None else list(r.replaces), **r.meta}
                    for r in records if isinstance(r, Packed)}
    if calq_modules:
        # transformers cannot run these modules; calq.load can (quant_method "calq" makes that explicit)
        config["quantization_config"] = {**config.get("quantization_config", {}), "quant_method": "calq",
                                          "calq_modules": calq_modules}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _files_bytes(out_dir: Path) -> int:
    return sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())


def write_checkpoint(model, records: list[Compressed | Packed], out_dir: Path, ignore: list[str]) -> dict:
    """Write into the existing empty out_dir. Returns byte counts for the report."""
    out_dir = Path(out_dir)
    state = model.state_dict()
    tied = tied_output_key(model)
    if tied is not None:
        state.pop(tied)  # as save_pretrained does: the embedding is stored once
    names = CheckpointNames(model)
    tensors, dense_bytes, modules, sizes = _stored(state, records, model.dtype, tied, names)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_config(model, records, ignore, out_dir, names)
    return {"checkpoint_bytes": _files_bytes(out_dir), "dense_bytes": dense_bytes, "modules": modules,
            "sizes": sizes}


class ShardedWriter:
    """The same checkpoint as `write_checkpoint`, written in `n_shards` pieces as the model is compressed.

    `add` writes one shard (a finished block) at once, so its tensors need not stay in RAM; `finish` writes
    everything not yet written (embeddings, final norm, lm_head) as the last shard, the index and config.json.
    """

    def __init__(self, out_dir: Path, n_shards: int, dtype: torch.dtype, names: CheckpointNames):
        self.out_dir, self.n_shards, self.dtype, self.names = Path(out_dir), n_shards, dtype, names
        self.weight_map: dict[str, str] = {}
        self.written: set[str] = set()          # state-dict keys already stored (before CT renaming)
        self.dense_bytes = 0
        self.modules: dict[str, dict] = {}
        self.sizes: dict[str, list] = {}
        self.total_size = 0
        self.shards = 0

    def add(self, state: dict[str, torch.Tensor], records: list[Compressed | Packed], tied: str | None = None) -> None:
        """Write one shard: `state` keyed as in the model's state dict, `records` the quantized modules in it."""
        if self.shards == self.n_shards:
            raise ValueError(f"all {self.n_shards} shards are written already")
        tensors, dense_bytes, modules, sizes = _stored(state, records, self.dtype, tied, self.names)
        self.shards += 1
        name = f"model-{self.shards:05d}-of-{self.n_shards:05d}.safetensors"
        save_file(tensors, str(self.out_dir / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.written.update(state)
        self.dense_bytes += dense_bytes
        self.modules.update(modules)
        self.sizes.update(sizes)
        self.total_size += sum(t.nbytes for t in tensors.values())

    def finish(self, model, records: list[Compressed | Packed], ignore: list[str]) -> dict:
        """Write the rest of `model` (its blocks may be on the meta device by now), the index and config.json.

        `records`: every quantized module of the model, for quantization_config. Returns what
        `write_checkpoint` returns."""
        tied = tied_output_key(model)
        rest = {k: v for k, v in model.state_dict().items() if k not in self.written and k != tied}
        unloaded = sorted(k for k, v in rest.items() if v.is_meta)
        if unloaded:
            raise ValueError(f"{len(unloaded)} tensors were neither written nor loaded, e.g. {unloaded[:3]}")
        left = {r.name for r in records} - set(self.modules)
        self.add(rest, [r for r in records if r.name in left], tied)
        if self.shards != self.n_shards:
            raise ValueError(f"wrote {self.shards} shards, announced {self.n_shards}")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_config(model, records, ignore, self.out_dir, self.names)
        return {"checkpoint_bytes": _files_bytes(self.out_dir), "dense_bytes": self.dense_bytes,
                "modules": self.modules, "sizes": self.sizes}
