"""Load a checkpoint written by `writer.py` (or a plain dense HF folder, or a GPTQ-layout one) as a dense
transformers model.

Quantized modules are dequantized with `ct.ct_dequantize`, using the config group whose targets match the
module (exact name, `re:` regex or class name, formats.md §1.1); modules in calq's own format
(`quantization_config.calq_modules`) by their method's `rebuild`. Safetensors only: nothing is unpickled.
`CheckpointReader` reads tensors lazily, a few modules at a time, from one file or from shards listed in
`model.safetensors.index.json`; disk offload uses it to fill one block at a time. A model with fused MoE experts
reads its hub checkpoint's per-expert tensors, dequantized one by one and stacked into the fused parameters
(calibration/experts.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from compressed_tensors.utils import is_match
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from calq.calibration.experts import CheckpointNames
from calq.export.ct import ct_dequantize
from calq.export.peft import ADAPTER_DIR, merge_adapter
from calq.export.writer import tied_output_key

_PACKED = ".weight_packed"
_CT_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
INDEX = "model.safetensors.index.json"
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def module_at(model, name: str) -> nn.Module:
    """The module at `name`, or a Linear standing in for an expert projection that exists only in the checkpoint
    (fused in the model): checkpoints target those as Linears (llm-compressor writes `targets: [Linear]`)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return nn.Linear(1, 1, bias=False, device="meta")


def _scheme_for(name: str, module, qconfig: dict) -> dict:
    for group in qconfig["config_groups"].values():
        if is_match(name, module, group["targets"], qconfig.get("ignore") or []):
            return group["weights"]
    raise ValueError(f"{name} has packed weights but no config group in quantization_config targets it")


def dense_config(path: Path):
    """(config of the dense architecture, quantization_config or None): we dequantize ourselves."""
    config = AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None:
        del config.quantization_config
    return config, qconfig


class CheckpointReader:
    """The tensors of a safetensors folder (one file or shards), read per key when asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.exists():
            self.files = json.loads(index.read_text())["weight_map"]    # key -> shard file name
        else:
            with safe_open(self.path / "model.safetensors", "pt") as st:
                self.files = dict.fromkeys(st.keys(), "model.safetensors")
        self.qconfig = dense_config(self.path)[1]
        adapter = self.path / ADAPTER_DIR
        self.adapter = adapter if (adapter / "adapter_config.json").is_file() else None
        self._names: tuple = (None, None)

    def names(self, model) -> CheckpointNames:
        """The model's checkpoint names (computed once per model: disk offload reads one block at a time)."""
        if self._names[0] is not model:
            self._names = (model, CheckpointNames(model))
        return self._names[1]

    def first_dtype(self) -> torch.dtype:
        """dtype of the first floating tensor: what transformers' dtype="auto" falls back to."""
        for k, name in self.files.items():
            with safe_open(self.path / name, "pt") as st:
                dtype = _DTYPES.get(st.get_slice(k).get_dtype())
            if dtype is not None:
                return dtype
        return torch.float32

    def _get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with safe_open(self.path / name, "pt") as st:
                out.update({k: st.get_tensor(k) for k in ks})
        return out

    def read(self, model, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """State-dict entries of `model` whose key passes `keep`; packed weights come out dequantized, fp32."""
        state = self._get([k for k in self.files if keep(k)])
        from calq.methods import METHODS

        for name, meta in ((self.qconfig or {}).get("calq_modules") or {}).items():
            if f"{name}.{meta['tensors'][0]}" not in state:
                continue                    # not among the selected keys
            # calq's own storage: the method rebuilds what the model needs from its tensors
            tensors = {k: state.pop(f"{name}.{k}") for k in meta["tensors"]}
            entries = METHODS[meta["method"]].rebuild(model, name, tensors, meta)
            state.update({f"{name}.{k}": v for k, v in entries.items()})
        for key in [k for k in state if k.endswith(".qweight")]:
            name = key.removesuffix(".qweight")
            state[f"{name}.weight"] = self._gptq_weight(model, name, state)
        for key in [k for k in state if k.endswith(_PACKED)]:
            name = key.removesuffix(_PACKED)
            if self.qconfig is None:
                raise ValueError(f"{key} is packed but config.json has no quantization_config")
            tensors = {n: state.pop(f"{name}.{n}") for n in _CT_NAMES if f"{name}.{n}" in state}
            if "weight_g_idx" in tensors:
                raise ValueError(f"{name}: actorder group (weight_g_idx) is not supported; formats.md §1.1")
            state[f"{name}.weight"] = ct_dequantize(tensors, _scheme_for(name, module_at(model, name), self.qconfig))
        return self.names(model).from_checkpoint(state)

    def _gptq_weight(self, model, name: str, state: dict) -> torch.Tensor:
        """A GPTQ-layout Linear (calq export, AutoGPTQ, GPTQModel; formats.md §2), dequantized in fp32."""
        from calq.export.gptq import gptq_dequantize

        q = self.qconfig or {}
        if q.get("quant_method") != "gptq":
            raise ValueError(f"{name}.qweight found but quant_method is {q.get('quant_method')!r}, not gptq")
        if q.get("bits") not in (2, 3, 4, 8):
            raise ValueError(f"GPTQ with {q.get('bits')} bits has no known packing (2, 3, 4 or 8)")
        t = {n: state.pop(f"{name}.{n}") for n in ("qweight", "qzeros", "scales", "g_idx") if f"{name}.{n}" in state}
        try:
            OC, IC = model.get_submodule(name).weight.shape
        except AttributeError:          # an expert projection, fused in the model: [IC·bits/32, OC] packed
            OC, IC = t["qweight"].shape[1], t["qweight"].shape[0] * 32 // q["bits"]
        v1 = (q.get("checkpoint_format") or q.get("format") or "gptq") == "gptq"
        return gptq_dequantize(t, q["bits"], OC, IC, zero_offset=1 if v1 else 0)

    def read_into(self, model, keep: Callable[[str], bool] = lambda k: True, assign: bool = False) -> None:
        """Load the selected entries into `model` in its own dtypes, then merge the adapters among them.

        assign=True replaces the (meta) tensors instead of copying into them: disk offload's onload.
        """
        state = self.read(model, keep)
        own = model.state_dict()
        tied = tied_output_key(model)
        expected = {k for k in own if keep(k)}
        missing = expected - set(state) - {tied}
        unexpected = set(state) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        if assign:
            state = {k: v.to(own[k].dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=assign)   # at most the tied embedding is absent
        if assign and tied is not None and keep(tied):
            model.tie_weights()     # the output embedding still points at the tensor it was built with
        if self.adapter is not None:
            merge_adapter(model, self.adapter, keep=lambda name: keep(f"{name}.weight"))


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """Dense model in `dtype`, eval mode, from a CT pack-quantized or plain dense safetensors folder."""
    model = AutoModelForCausalLM.from_config(dense_config(path)[0], dtype=dtype)
    CheckpointReader(path).read_into(model)
    return model.to(device).eval()
