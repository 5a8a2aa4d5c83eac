"""Resumable runs: each finished block is saved as it completes, and a later run continues after the last one.

In `RUN/resume/` (inside the run's partial output folder): `manifest.json` (what must match to continue: the
resolved recipe, the model's fingerprint, calq and torch versions, offload mode), and per finished block i
`block-iiii.safetensors` (the block's state as it rests after compression, the records' tensors),
`streams-iiii.safetensors` (the calibration activations the next block reads; only the latest are kept) and
`block-iiii.json` (records, results, torch's RNG state), written last, so a block counts as finished only once
all three are whole. Continuing loads those states instead of recomputing them and restores the RNG and the
streams, so the checkpoint equals an uninterrupted run's byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calq.calibration.adapters import attach_adapter
from calq.errors import CalqError
from calq.methods.base import Adapter, Compressed, Packed, Replaced

DIR = "resume"
MANIFEST = "manifest.json"
_KINDS = {"compressed": Compressed, "packed": Packed, "replaced": Replaced, "adapter": Adapter}
_TENSOR_FIELDS = {"compressed": ("codes", "scale", "zero"), "adapter": ("A", "B")}
_DROPPED = ("W_hat", "W_new", "W_base", "module")      # dense copies the engine installs, then drops


def fingerprint(path: Path) -> dict:
    """Names, sizes and modification times of a model's files (a GGUF: the file): cheap, and any rewrite shows."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts))
    return {str(p.relative_to(path.parent if path.is_file() else path)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in files}


def _kind(rec) -> str:
    return next(k for k, cls in _KINDS.items() if isinstance(rec, cls))


def _record_json(rec, key: str, tensors: dict) -> dict:
    kind = _kind(rec)
    out = {"kind": kind}
    for f in fields(rec):
        v = getattr(rec, f.name)
        if f.name in _DROPPED:
            continue
        if kind == "packed" and f.name == "tensors":
            out["tensors"] = sorted(v)
            tensors.update({f"{key}.t.{k}": t.contiguous() for k, t in v.items()})
        elif f.name in _TENSOR_FIELDS.get(kind, ()):
            out[f.name] = v is not None
            if v is not None:
                tensors[f"{key}.{f.name}"] = v.contiguous()
        else:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _record(data: dict, key: str, tensors: dict):
    data = dict(data)
    kind = data.pop("kind")
    if kind == "packed":
        data["tensors"] = {k: tensors[f"{key}.t.{k}"] for k in data["tensors"]}
        data["replaces"] = None if data["replaces"] is None else tuple(data["replaces"])
    for name in _TENSOR_FIELDS.get(kind, ()):
        data[name] = tensors[f"{key}.{name}"] if data[name] else None
    cls = _KINDS[kind]
    data.update({f.name: None for f in fields(cls) if f.name in _DROPPED})
    return cls(**data)


def _streams(inputs: list, stage_inputs: dict, fp_inputs: list | None) -> dict[str, torch.Tensor]:
    out = {f"stream.main.{j}": h for j, (h, _) in enumerate(inputs)}
    for k, stream in stage_inputs.items():
        out.update({f"stream.stage{k}.{j}": h for j, (h, _) in enumerate(stream)})
    if fp_inputs is not None:
        out.update({f"stream.fp.{j}": h for j, (h, _) in enumerate(fp_inputs)})
    return {k: v.contiguous() for k, v in out.items()}


class BlockStore:
    """The finished blocks of one run, in `folder` (RUN/resume)."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / MANIFEST
        if path.is_file():
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if diff:
                raise CalqError(f"the partial run in {self.folder.parent} was made with a different {', '.join(diff)}",
                                f"rerun with the same ones, or delete {self.folder.parent} to start over")
        else:
            _write_atomic(path, json.dumps(manifest, indent=1).encode())
        self.done = 0
        while (self.folder / f"block-{self.done:04d}.json").is_file():
            self.done += 1

    def save(self, i: int, block, results: dict, inputs: list, stage_inputs: dict, fp_inputs: list | None) -> None:
        """Block i, finished and resting on CPU; results: its entries of the engine's result (lists and dicts)."""
        tensors = {f"state.{k}": v.detach().contiguous() for k, v in block.state_dict().items()}
        meta = {}
        for name in ("modules", "replaced"):
            meta[name] = [{"record": _record_json(m.record, f"{name}.{j}", tensors), "rel_error": m.rel_error,
                           "seconds": m.seconds, "tokens": m.tokens, "excluded_tokens": m.excluded_tokens}
                          for j, m in enumerate(results[name])]
        meta["adapters"] = [{"record": _record_json(a.adapter, f"adapters.{j}", tensors),
                             "rel_error_before": a.rel_error_before, "rel_error_after": a.rel_error_after}
                            for j, a in enumerate(results["adapters"])]
        meta.update(skipped=results["skipped"], expert_tokens=results["expert_tokens"],
                    seconds=results["seconds"], rng=base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode())
        _save_atomic(tensors, self.folder / f"block-{i:04d}.safetensors")
        _save_atomic(_streams(inputs, stage_inputs, fp_inputs), self.folder / f"streams-{i:04d}.safetensors")
        _write_atomic(self.folder / f"block-{i:04d}.json", json.dumps(meta).encode())      # block i counts now
        (self.folder / f"streams-{i - 1:04d}.safetensors").unlink(missing_ok=True)        # stale

    def restore(self, i: int, block, prefix: str, result) -> None:
        """Put block i back as it rested after compression, and its entries into the engine's result."""
        from calq.calibration.engine import AdapterResult, ModuleResult
        from calq.methods import METHODS

        tensors = load_file(str(self.folder / f"block-{i:04d}.safetensors"))
        meta = json.loads((self.folder / f"block-{i:04d}.json").read_text())
        state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        records = {name: [_record(m["record"], f"{name}.{j}", tensors) for j, m in enumerate(meta[name])]
                   for name in ("modules", "replaced")}
        for rec in records["modules"]:
            if isinstance(rec, Packed) and rec.replaces is None:     # a whole submodule in calq's format (Quamba)
                METHODS[rec.method].rebuild(block, rec.name[len(prefix) + 1:], rec.tensors, rec.meta)
        block.load_state_dict(state, strict=True)
        for name in ("modules", "replaced"):
            getattr(result, name).extend(
                ModuleResult(rec, m["rel_error"], m["seconds"], m["tokens"], m["excluded_tokens"])
                for rec, m in zip(records[name], meta[name], strict=True))
        for j, a in enumerate(meta["adapters"]):
            rec = _record(a["record"], f"adapters.{j}", tensors)
            attach_adapter(block.get_submodule(rec.name[len(prefix) + 1:]), rec.A, rec.B)
            result.adapters.append(AdapterResult(rec, a["rel_error_before"], a["rel_error_after"]))
        result.skipped += meta["skipped"]
        for path, counts in meta["expert_tokens"].items():
            result.expert_tokens.setdefault(path, counts)
        result.block_seconds.append(meta["seconds"])

    def resume_streams(self, inputs: list, stage_inputs: dict, fp_inputs: list | None) -> None:
        """The calibration streams as they were after the last finished block (in place), and torch's RNG."""
        i = self.done - 1
        tensors = load_file(str(self.folder / f"streams-{i:04d}.safetensors"))
        for j, (_, kw) in enumerate(inputs):
            inputs[j] = (tensors[f"stream.main.{j}"], kw)
        for k, stream in stage_inputs.items():
            for j, (_, kw) in enumerate(stream):
                stream[j] = (tensors[f"stream.stage{k}.{j}"], kw)
        if fp_inputs is not None:
            for j, (_, kw) in enumerate(fp_inputs):
                fp_inputs[j] = (tensors[f"stream.fp.{j}"], kw)
        meta = json.loads((self.folder / f"block-{i:04d}.json").read_text())
        rng = torch.frombuffer(bytearray(base64.b64decode(meta["rng"])), dtype=torch.uint8)
        torch.set_rng_state(rng)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def recipe_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class SharedStore:
    """Rank 0's BlockStore as every rank of a distributed run sees it (calibration/distributed.py).

    Only rank 0 reads and writes the folder. The streams are saved whole, every rank's share in batch order as a
    single process saves them, and handed back in shares on resuming; the other ranks need nothing else, since
    only rank 0 keeps the records and writes the checkpoint.
    """

    def __init__(self, store: BlockStore | None, group):
        self.store, self.group = store, group
        self.done = group.broadcast(store.done if store is not None else None)

    def restore(self, i: int, block, prefix: str, result) -> None:
        if self.store is not None:
            self.store.restore(i, block, prefix, result)
        else:
            result.block_seconds.append(0.0)

    def save(self, i: int, block, results: dict, inputs: list, stage_inputs: dict, fp_inputs: list | None) -> None:
        shares = self.group.gather(_hidden(inputs, stage_inputs, fp_inputs))
        if self.store is None:
            return
        whole = [[(h, None) for part in shares for h in part[k]] if shares[0][k] is not None else None
                 for k in range(len(shares[0]))]
        stage = dict(zip(stage_inputs, whole[1:-1], strict=True))
        self.store.save(i, block, results, whole[0], stage, whole[-1])

    def resume_streams(self, inputs: list, stage_inputs: dict, fp_inputs: list | None) -> None:
        streams = (inputs, *stage_inputs.values(), fp_inputs)
        lengths = self.group.gather([None if s is None else len(s) for s in streams])
        parts = None
        if self.store is not None:
            n = [sum(part[k] for part in lengths) if lengths[0][k] is not None else None
                 for k in range(len(lengths[0]))]
            whole = [None if m is None else [(None, None)] * m for m in n]
            self.store.resume_streams(whole[0], dict(zip(stage_inputs, whole[1:-1], strict=True)), whole[-1])
            parts, start = [], [0] * len(n)
            for part in lengths:
                parts.append(([None if w is None else [h for h, _ in w[a:a + m]]
                               for w, a, m in zip(whole, start, part, strict=True)], torch.get_rng_state()))
                start = [a + (m or 0) for a, m in zip(start, part, strict=True)]
        mine, rng = self.group.scatter(parts)
        for stream, hidden in zip([inputs, *stage_inputs.values(), fp_inputs], mine, strict=True):
            for j, h in enumerate(hidden or []):
                stream[j] = (h, stream[j][1])
        torch.set_rng_state(rng)


def _hidden(inputs: list, stage_inputs: dict, fp_inputs: list | None) -> list:
    """The hidden states of each stream (main, each stage's own, the FP path or None), without their kwargs."""
    return [None if s is None else [h for h, _ in s] for s in (inputs, *stage_inputs.values(), fp_inputs)]
