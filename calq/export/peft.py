"""Low-rank adapters as a PEFT LoRA folder next to the checkpoint (formats.md §3).

`adapter/adapter_config.json` + `adapter/adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` [r, IC] and `...lora_B.weight` [OC, r]. lora_alpha = r, so
PEFT's scaling alpha/r is 1 and B·A is the whole correction (GPTQModel's EoRA convention). Ranks that differ
from the most common one go into rank_pattern/alpha_pattern keyed by the escaped full module path.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from calq.errors import ModelError
from calq.files import open_safetensors, read_json
from calq.methods.base import Adapter

ADAPTER_DIR = "adapter"


def write_adapter(adapters: list[Adapter], out_dir: Path, base_model: str, dtype: torch.dtype) -> int:
    """Write the adapter folder; returns its tensors' bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for a in adapters:
        tensors[f"base_model.model.{a.name}.lora_A.weight"] = a.A.to(dtype).contiguous()
        tensors[f"base_model.model.{a.name}.lora_B.weight"] = a.B.to(dtype).contiguous()
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    r = Counter(a.rank for a in adapters).most_common(1)[0][0]
    pattern = {re.escape(a.name): a.rank for a in adapters if a.rank != r}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
              "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(a.name for a in adapters), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sum(t.numel() * t.element_size() for t in tensors.values())


DAMAGED_ADAPTER = "the adapter folder is damaged; write the checkpoint again"


def check_adapter(adapter_dir: Path) -> dict:
    """The adapter's config (with a lora_alpha) and a sound safetensors header; returns the config."""
    cfg = read_json(adapter_dir / "adapter_config.json")
    if not isinstance(cfg.get("lora_alpha"), (int, float)) or not isinstance(cfg.get("alpha_pattern") or {}, dict):
        raise ModelError(f"{adapter_dir}/adapter_config.json has no lora_alpha (or a bad alpha_pattern)",
                         DAMAGED_ADAPTER)
    with open_safetensors(adapter_dir / "adapter_model.safetensors"):
        pass
    return cfg


@torch.no_grad()
def merge_adapter(model: torch.nn.Module, adapter_dir: Path, keep: Callable[[str], bool] = lambda name: True) -> int:
    """Add scaling·B·A of every adapted Linear that `keep` accepts into its weight (fp32 math).

    Returns the number merged."""
    cfg = check_adapter(adapter_dir)
    modules = dict(model.named_modules())
    merged = 0
    with open_safetensors(adapter_dir / "adapter_model.safetensors") as st:
        keys = set(st.keys())
        for key in sorted(keys):
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len("base_model.model."):-len(".lora_A.weight")]
            if not keep(name):
                continue
            key_b = key.replace("lora_A", "lora_B")
            A = st.get_tensor(key).float()
            B = st.get_tensor(key_b).float() if key_b in keys else None
            w = getattr(modules.get(name), "weight", None)
            if B is None or w is None or A.dim() != 2 or tuple(B.shape) != (w.shape[0], A.shape[0]) \
                    or A.shape[1] != w.shape[1]:
                raise ModelError(f"{adapter_dir}: the adapter of {name} does not fit the model (module, lora_B or "
                                 "shapes)", DAMAGED_ADAPTER)
            pat = next((k for k in cfg.get("alpha_pattern") or {} if re.match(rf"(.*\.)?({k})$", name)), None)
            alpha = cfg["alpha_pattern"][pat] if pat else cfg["lora_alpha"]
            scale = alpha / A.shape[0] if not cfg.get("use_rslora") else alpha / A.shape[0] ** 0.5
            w.copy_((w.float() + scale * (B @ A)).to(w.dtype))
            merged += 1
    return merged
