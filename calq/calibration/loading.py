"""Model references -> transformers models: zoo names, local folders (dense or calq checkpoints), GGUF files,
hub ids; and what a report records about where the weights came from."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from calq.calibration.gguf import gguf_info, is_gguf, load_dtype, load_gguf
from calq.errors import ModelError
from calq.export.peft import ADAPTER_DIR
from calq.zoo import resolve_model

MODEL_HELP = "give a local model directory, a .gguf file, zoo:NAME (calq zoo list), or a hub id while online"


def quiet_transformers() -> None:
    # calq draws its own progress; transformers' per-load bars and notices would interleave with it.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def is_calq_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and ("quantization_config" in json.loads(cfg.read_text())
                              or (path / ADAPTER_DIR / "adapter_config.json").is_file())


def looks_like_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not Path(ref).exists()


def load_model(ref: str, dtype: torch.dtype | None = torch.float32, with_tokenizer: bool = True,
               notify: Callable[[str], None] | None = None):
    """(model, tokenizer or None, original dtype) for a zoo name, local directory, GGUF file or hub id; on CPU.

    dtype None keeps the checkpoint's own dtype (what compression does: blocks are upcast one at a time).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = resolve_model(ref, notify)
    local = Path(path).expanduser()
    if is_gguf(path):
        model, tokenizer = load_gguf(local, dtype, with_tokenizer)
        return model, tokenizer, load_dtype(local.resolve())
    if (ref.startswith((".", "/", "~")) or os.sep in ref and not looks_like_hub_id(ref)) and not local.exists():
        raise ModelError(f"model not found: {ref}", MODEL_HELP)
    try:
        if local.is_dir() and is_calq_checkpoint(local):
            from calq.export.reader import load_checkpoint

            model = load_checkpoint(local, dtype=dtype or torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load model {ref}: {str(e).splitlines()[0]}", MODEL_HELP) from None
    orig = getattr(AutoConfig.from_pretrained(path), "dtype", None) or torch.float16
    orig = getattr(torch, orig) if isinstance(orig, str) else orig
    return model.eval(), tokenizer, orig


def source_info(ref: str) -> dict:
    """Where a model's weights came from, for the report: a GGUF file's type and sha256; for a folder
    converted from one (zoo:smollm2), that record; else the folder or hub id."""
    from calq.zoo.packaged import SOURCE_FILE

    path = resolve_model(ref)
    if is_gguf(path):
        return gguf_info(path)
    local = Path(path).expanduser()
    if local.is_dir():
        info = {"format": "calq checkpoint" if is_calq_checkpoint(local) else "safetensors",
                "path": str(local.resolve())}
        marker = local / SOURCE_FILE
        if marker.is_file():
            info["converted_from"] = json.loads(marker.read_text())
        return info
    return {"format": "hub", "id": ref}
