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

from collections.abc import Callable
from pathlib import Path

import torch
from compressed_tensors.utils import is_match
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from calq.calibration.experts import CheckpointNames
from calq.errors import ModelError
from calq.export.ct import ct_dequantize
from calq.export.peft import ADAPTER_DIR, merge_adapter
from calq.export.qconfig import DAMAGED, check_quantization_config
from calq.export.writer import tied_output_key
from calq.files import check_finite, open_safetensors, read_json

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
    for group in (qconfig.get("config_groups") or {}).values():
        if is_match(name, module, group["targets"], qconfig.get("ignore") or []):
            return group["weights"]
    raise ModelError(f"{name} has packed weights but no config group in quantization_config targets it", DAMAGED)


def dense_config(path: Path):
    """(config of the dense architecture, quantization_config or None): we dequantize ourselves."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (no config.json)", "give a calq output or model folder")
    raw = read_json(path / "config.json")
    if raw.get("quantization_config") is not None:
        check_quantization_config(raw["quantization_config"], path / "config.json")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}/config.json: {str(e).strip().splitlines()[0]}",
                         "give a model folder of an architecture transformers knows") from None
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
            self.files = read_json(index).get("weight_map")    # key -> shard file name
            if not isinstance(self.files, dict) or not all(isinstance(f, str) for f in self.files.values()):
                raise ModelError(f"{index} has no weight_map of file names", DAMAGED)
            shards = set(self.files.values())
        else:
            shards = {"model.safetensors"}
            if not (self.path / "model.safetensors").is_file():
                raise ModelError(f"{self.path} has no model.safetensors", "give a folder of safetensors weights")
        present: dict[str, str] = {}
        for name in sorted(shards):     # every header read once: a bad file is refused before any work
            if not (self.path / name).is_file():
                raise ModelError(f"{name} is listed in {index} but missing", "download or write the model again")
            with open_safetensors(self.path / name) as st:
                present.update(dict.fromkeys(st.keys(), name))
        if index.exists():
            lost = sorted(k for k, f in self.files.items() if present.get(k) != f)
            if lost:
                raise ModelError(f"{lost[0]} is listed in {index} but not in {self.files[lost[0]]}", DAMAGED)
        self.files = present
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
            with open_safetensors(self.path / name) as st:
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
            with open_safetensors(self.path / name) as st:
                out.update({k: st.get_tensor(k) for k in ks})
        return out

    def read(self, model, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """State-dict entries of `model` whose key passes `keep`; packed weights come out dequantized, fp32."""
        state = self._get([k for k in self.files if keep(k)])
        from calq.methods import METHODS

        for name, meta in ((self.qconfig or {}).get("calq_modules") or {}).items():
            if f"{name}.{meta['tensors'][0]}" not in state:
                continue                    # not among the selected keys
            lost = [k for k in meta["tensors"] if f"{name}.{k}" not in state]
            if lost:
                raise ModelError(f"{self.path}: {name}.{lost[0]} is missing from the weights", DAMAGED)
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
                raise ModelError(f"{key} is packed but config.json has no quantization_config", DAMAGED)
            tensors = {n: state.pop(f"{name}.{n}") for n in _CT_NAMES if f"{name}.{n}" in state}
            if "weight_g_idx" in tensors:
                raise ModelError(f"{name}: actorder group (weight_g_idx) is not supported; formats.md §1.1",
                                 "quantize without actorder: group, or with actorder: static")
            own = tensors["weight_shape"].tolist() if "weight_shape" in tensors else None
            scheme = _scheme_for(name, module_at(model, name), self.qconfig)
            check_ct_tensors(name, tensors, scheme, self.linear_shape(model, name, own))
            state[f"{name}.weight"] = ct_dequantize(tensors, scheme)
        return self.names(model).from_checkpoint(state)

    def linear_shape(self, model, name: str, own: list | None) -> tuple[int, int]:
        """[OC, IC] of the Linear at `name`; an expert projection fused in the model has no module, and its own
        tensors give the shape (the fused parameter's shape is checked when the experts are put back together)."""
        try:
            return tuple(model.get_submodule(name).weight.shape)
        except AttributeError:
            if own is None or len(own) != 2 or not self.names(model).active:
                raise ModelError(f"the weights name {name}, which the architecture has no module for",
                                 DAMAGED) from None
            return int(own[0]), int(own[1])

    def _gptq_weight(self, model, name: str, state: dict) -> torch.Tensor:
        """A GPTQ-layout Linear (calq export, AutoGPTQ, GPTQModel; formats.md §2), dequantized in fp32."""
        from calq.export.gptq import gptq_dequantize

        q = self.qconfig or {}
        if q.get("quant_method") != "gptq":
            raise ModelError(f"{name}.qweight found but quant_method is {q.get('quant_method')!r}, not gptq", DAMAGED)
        t = {n: state.pop(f"{name}.{n}") for n in ("qweight", "qzeros", "scales", "g_idx") if f"{name}.{n}" in state}
        b = q["bits"]
        own = [t["qweight"].shape[1], t["qweight"].shape[0] * 32 // b] if "qweight" in t else None
        OC, IC = self.linear_shape(model, name, own)
        G = t["scales"].shape[0] if "scales" in t and t["scales"].dim() == 2 else 0
        want = {"qweight": (IC * b // 32, OC), "qzeros": (G, OC * b // 32), "scales": (G, OC), "g_idx": (IC,)}
        wrong = [n for n in ("qweight", "qzeros", "scales") if n not in t or tuple(t[n].shape) != want[n]]
        wrong += [n for n in ("g_idx",) if n in t and tuple(t[n].shape) != want[n]]
        if wrong or G == 0 or IC % G or ("g_idx" in t and not 0 <= int(t["g_idx"].min()) <= int(t["g_idx"].max()) < G):
            raise ModelError(f"{self.path}: {name}.{(wrong or ['g_idx'])[0]} is missing or does not fit a "
                             f"{OC}x{IC} Linear at {b} bits", DAMAGED)
        v1 = (q.get("checkpoint_format") or q.get("format") or "gptq") == "gptq"
        return gptq_dequantize(t, b, OC, IC, zero_offset=1 if v1 else 0)

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
            raise ModelError(f"{self.path} does not match its architecture: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}", DAMAGED)
        wrong = next((k for k, v in state.items() if v.shape != own[k].shape), None)
        if wrong is not None:
            raise ModelError(f"{self.path}: {wrong} has shape {list(state[wrong].shape)}, the architecture needs "
                             f"{list(own[wrong].shape)}", DAMAGED)
        check_finite(state.items(), str(self.path))
        if assign:
            state = {k: v.to(own[k].dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=assign)   # at most the tied embedding is absent
        if assign and tied is not None and keep(tied):
            model.tie_weights()     # the output embedding still points at the tensor it was built with
        if self.adapter is not None:
            merge_adapter(model, self.adapter, keep=lambda name: keep(f"{name}.weight"))


def check_ct_tensors(name: str, t: dict[str, torch.Tensor], scheme: dict, shape: tuple[int, int]) -> None:
    """A compressed-tensors module's tensors fit its Linear [OC, IC] and its scheme (else dequantizing would
    fail deep inside compressed-tensors, or read garbage)."""
    OC, IC = shape
    lost = [n for n in ("weight_packed", "weight_scale", "weight_shape") if n not in t]
    if not lost and tuple(t["weight_shape"].tolist()) != (OC, IC):
        lost = ["weight_shape"]
    if not lost and (t["weight_packed"].dtype != torch.int32 or
                     tuple(t["weight_packed"].shape) != (OC, -(-IC * scheme["num_bits"] // 32))):
        lost = ["weight_packed"]
    if not lost:
        strategy, g = scheme.get("strategy"), scheme.get("group_size")
        scale = {"group": (OC, IC // g) if isinstance(g, int) and g > 0 and IC % g == 0 else None,
                 "channel": (OC, 1)}.get(strategy, tuple(t["weight_scale"].shape))
        if tuple(t["weight_scale"].shape) != scale or not torch.isfinite(t["weight_scale"]).all():
            lost = ["weight_scale"]
        elif not scheme.get("symmetric") and "weight_zero_point" not in t:
            lost = ["weight_zero_point"]
    if lost:
        raise ModelError(f"{name}.{lost[0]} is missing, not finite, or does not fit a {OC}x{IC} Linear with "
                         f"{scheme.get('num_bits')}-bit {scheme.get('strategy')} weights", DAMAGED)


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """Dense model in `dtype`, eval mode, from a CT pack-quantized or plain dense safetensors folder."""
    model = AutoModelForCausalLM.from_config(dense_config(path)[0], dtype=dtype)
    CheckpointReader(path).read_into(model)
    return model.to(device).eval()
