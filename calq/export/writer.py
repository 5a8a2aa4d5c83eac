"""Write a compressed-tensors checkpoint: `model.safetensors` + `config.json` (formats.md §1.1, §1.2, §1.5).

Every tensor of the model's state dict is stored in the model's dtype, except that each quantized module's
`weight` becomes its CT tensors. The caller owns the temporary directory and the final rename.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from calq.export.ct import ct_quantization_config, ct_tensors
from calq.methods.base import Compressed, Packed


def tied_output_key(model) -> str | None:
    """State-dict key of the output embedding when it shares its tensor with the input embedding."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    return next(f"{name}.weight" for name, m in model.named_modules() if m is out)


def write_checkpoint(model, records: list[Compressed | Packed], out_dir: Path, ignore: list[str]) -> dict:
    """Write into the existing empty out_dir. Returns byte counts for the report.

    `Packed` records (calq's own storage) make the checkpoint calq-only: quant_method "calq", their meta under
    `quantization_config.calq_modules`, and any compressed-tensors modules described by the usual groups.
    """
    out_dir = Path(out_dir)
    dtype = model.dtype
    state = model.state_dict()
    tied = tied_output_key(model)
    if tied is not None:
        state.pop(tied)  # as save_pretrained does: the embedding is stored once
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    dense_bytes = sum(t.nbytes for t in tensors.values())
    modules = {}
    calq_modules = {}
    for rec in [r for r in records if isinstance(r, Packed)]:
        prefix = f"{rec.name}."
        keys = [k for k in tensors if k.startswith(prefix)] if rec.replaces is None else \
            [prefix + k for k in rec.replaces]
        if not keys or any(k not in tensors for k in keys):
            raise ValueError(f"record {rec.name!r} replaces {keys}, which are not all in the model's state dict")
        dense = sum(tensors.pop(k).nbytes for k in keys)
        tensors.update({prefix + k: v.contiguous() for k, v in rec.tensors.items()})
        nbytes = sum(v.nbytes for v in rec.tensors.values())
        modules[rec.name] = {"bytes": nbytes, "dense_bytes": dense, "bits_per_weight": 8 * nbytes / rec.n_weights}
        calq_modules[rec.name] = {"method": rec.method, "tensors": sorted(rec.tensors), "n_weights": rec.n_weights,
                                  "replaces": None if rec.replaces is None else list(rec.replaces), **rec.meta}
    records = [r for r in records if not isinstance(r, Packed)]
    for rec in records:
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
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config.pop("quantization_config", None)
    if records:
        config["quantization_config"] = ct_quantization_config(records, ignore)
    if calq_modules:
        # transformers cannot run these modules; calq.load can (quant_method "calq" makes that explicit)
        config["quantization_config"] = {**config.get("quantization_config", {}), "quant_method": "calq",
                                          "calq_modules": calq_modules}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    checkpoint_bytes = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    return {"checkpoint_bytes": checkpoint_bytes, "dense_bytes": dense_bytes, "modules": modules}
