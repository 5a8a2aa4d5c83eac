"""Model references -> transformers models: zoo names, local folders (dense or calq checkpoints), GGUF files,
hub ids; and what a report records about where the weights came from."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from calq.calibration.gguf import gguf_info, is_gguf, load_dtype, load_gguf
from calq.errors import ModelError
from calq.export.peft import ADAPTER_DIR
from calq.files import check_finite, read_json
from calq.zoo import resolve_model

MODEL_HELP = "give a local model directory, a .gguf file, zoo:NAME (calq zoo list), or a hub id while online"


def quiet_transformers() -> None:
    # calq draws its own progress; transformers' per-load bars and notices, and the hub client's retry warnings
    # (a dozen lines for an unreachable hub id), would interleave with it.
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


def is_calq_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and ("quantization_config" in read_json(cfg)
                              or (path / ADAPTER_DIR / "adapter_config.json").is_file())


def looks_like_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not Path(ref).exists()


PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_folder(path: Path, allow_pickle: bool = False) -> dict:
    """Before transformers reads a local model folder: its config.json parses and names a causal LM, it has
    safetensors weights (pickles only with allow_pickle), and `CheckpointReader` accepts its quantization_config
    (if any), its index and every safetensors header. Returns the config as a dict."""
    from calq.export.reader import CheckpointReader

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (no config.json)", MODEL_HELP)
    config = read_json(path / "config.json")
    check_causal_lm(config, path)
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLES for p in path.glob(pattern))
        if not pickles:
            raise ModelError(f"{path} holds no weights (no *.safetensors file)", MODEL_HELP)
        if not allow_pickle:
            raise ModelError(f"{path} holds only pickle weights ({', '.join(pickles[:3])}), which calq does not load",
                             "convert them once in a trusted environment: python -c \"from transformers import "
                             f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-st')\" "
                             "(or pass --allow-pickle: torch's weights_only loader)")
        return config
    CheckpointReader(path)          # quantization_config, the index, and every safetensors header
    return config


def check_causal_lm(config: dict, where) -> None:
    """Refuse encoders (BERT, RoBERTa, T5...): transformers would load a masked-LM checkpoint as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = config.get("architectures") or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs and isinstance(archs, list) and not any(a in causal or str(a).endswith(("ForCausalLM", "LMHeadModel"))
                                                     for a in archs):
        raise ModelError(f"{where} is a {', '.join(map(str, archs))}, not a causal (decoder-only) language model",
                         "calq compresses causal LMs (Llama, Mistral, Qwen2, OPT, Phi3, Mamba, ...)")


def _check_loaded(info: dict, ref: str) -> None:
    """transformers fills weights missing from the files (or of the wrong shape) with random values: refuse."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing:
        raise ModelError(f"{ref} lacks {len(missing)} weights the architecture needs, e.g. {', '.join(missing[:3])}",
                         "the model files are incomplete; download or convert the model again")
    if mismatched:
        key, got, want = mismatched[0]
        raise ModelError(f"{ref}: {key} has shape {list(got)} in the files but the architecture needs {list(want)}",
                         "config.json does not match the weights; download the model again")


def load_model(ref: str, dtype: torch.dtype | None = torch.float32, with_tokenizer: bool = True,
               notify: Callable[[str], None] | None = None, allow_pickle: bool = False):
    """(model, tokenizer or None, original dtype) for a zoo name, local directory, GGUF file or hub id; on CPU.

    dtype None keeps the checkpoint's own dtype (what compression does: blocks are upcast one at a time).
    allow_pickle: read a folder's `pytorch_model.bin` when it has no safetensors (through transformers'
    weights_only loader, which refuses pickled code).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model(ref, notify)
    local = Path(path).expanduser()
    if is_gguf(path):
        model, tokenizer = load_gguf(local, dtype, with_tokenizer)
        check_finite(model.named_parameters(), ref)
        return model, tokenizer, load_dtype(local.resolve())
    if (ref.startswith((".", "/", "~")) or os.sep in ref and not looks_like_hub_id(ref)) and not local.exists():
        raise ModelError(f"model not found: {ref}", MODEL_HELP)
    if local.exists() and not local.is_dir():
        raise ModelError(f"{ref} is a file, not a model folder", MODEL_HELP)
    if local.is_dir():
        check_folder(local, allow_pickle)
    try:
        if local.is_dir() and is_calq_checkpoint(local):
            from calq.export.reader import load_checkpoint

            model = load_checkpoint(local, dtype=dtype or torch.float32)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or "auto", use_safetensors=None if allow_pickle else True,
                output_loading_info=True, ignore_mismatched_sizes=True)
            _check_loaded(info, ref)
        orig = getattr(AutoConfig.from_pretrained(path), "dtype", None) or torch.float16
    except pickle.UnpicklingError:
        raise ModelError(f"{ref}: its pickle holds more than tensors, so torch's weights_only loader refused it "
                         "(nothing in it was run)", "get the model as safetensors from a source you trust") from None
    except (OSError, ValueError) as e:
        # transformers' messages for unreachable hubs, unknown architectures and refused pickles
        raise ModelError(f"could not load model {ref}: {_first_line(e)}", MODEL_HELP) from None
    tokenizer = load_tokenizer(path, ref) if with_tokenizer else None
    check_causal_lm(model.config.to_dict(), ref)
    check_finite(model.named_parameters(), ref)
    orig = getattr(torch, orig) if isinstance(orig, str) else orig
    return model.eval(), tokenizer, orig


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_tokenizer(path, ref: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:     # no tokenizer files, or damaged ones
        raise ModelError(f"could not load the tokenizer of {ref}: {_first_line(e)}",
                         "the model folder needs tokenizer.json or tokenizer_config.json (save_pretrained writes "
                         "them)") from None


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
            info["converted_from"] = read_json(marker)
        return info
    return {"format": "hub", "id": ref}
