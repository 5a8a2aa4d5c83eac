"""Load a checkpoint written by `writer.py` (or a plain dense HF folder) as a dense transformers model.

Quantized modules are dequantized with `ct.ct_dequantize`, using the config group whose targets match the
module (exact name, `re:` regex or class name, formats.md §1.1); modules in calq's own format
(`quantization_config.calq_modules`) by their method's `rebuild`. Safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.utils import is_match
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from calq.export.ct import ct_dequantize
from calq.export.peft import ADAPTER_DIR, merge_adapter
from calq.export.writer import tied_output_key

_PACKED = ".weight_packed"
_CT_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    return state


def _scheme_for(name: str, module, qconfig: dict) -> dict:
    for group in qconfig["config_groups"].values():
        if is_match(name, module, group["targets"], qconfig.get("ignore") or []):
            return group["weights"]
    raise ValueError(f"{name} has packed weights but no config group in quantization_config targets it")


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """Dense model in `dtype`, eval mode, from a CT pack-quantized or plain dense safetensors folder."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None:
        del config.quantization_config  # build the dense architecture; we dequantize ourselves
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    state = _read_tensors(path)
    from calq.methods import METHODS

    for name, meta in ((qconfig or {}).get("calq_modules") or {}).items():
        # calq's own storage: the method rebuilds what the model needs from its tensors
        tensors = {k: state.pop(f"{name}.{k}") for k in meta["tensors"]}
        entries = METHODS[meta["method"]].rebuild(model, name, tensors, meta)
        state.update({f"{name}.{k}": v for k, v in entries.items()})
    for key in [k for k in state if k.endswith(_PACKED)]:
        name = key.removesuffix(_PACKED)
        if qconfig is None:
            raise ValueError(f"{key} is packed but config.json has no quantization_config")
        tensors = {n: state.pop(f"{name}.{n}") for n in _CT_NAMES if f"{name}.{n}" in state}
        if "weight_g_idx" in tensors:
            raise ValueError(f"{name}: actorder group (weight_g_idx) is not supported; formats.md §1.1")
        state[f"{name}.weight"] = ct_dequantize(tensors, _scheme_for(name, model.get_submodule(name), qconfig))

    expected = set(model.state_dict())
    tied = tied_output_key(model)
    missing = expected - set(state) - {tied}
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)  # at most the tied output embedding is absent, checked above
    adapter = path / ADAPTER_DIR
    if (adapter / "adapter_config.json").is_file():
        merge_adapter(model, adapter)             # low-rank compensation (EoRA) saved next to the base
    return model.to(device).eval()
