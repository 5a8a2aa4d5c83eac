"""GGUF files as a model source: llama.cpp's format, read through transformers' GGUF loader, dequantized.

Anywhere calq takes a model, a path ending in `.gguf` names one. transformers turns the file into its own
architecture (llama.cpp's q/k permutation undone, tensor names mapped) and, with `GgufConfig(dequantize=True)`,
unpacks every block format into a dense tensor, so methods see ordinary Linears. What the report needs to say
where the weights came from (block formats, sha256) is read from the header with the `gguf` package.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from calq.errors import ModelError

SUFFIX = ".gguf"
MAGIC = b"GGUF"


def is_gguf(ref: str | Path) -> bool:
    return str(ref).lower().endswith(SUFFIX)


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}", "check the path")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                         "give a .gguf file written by llama.cpp or the gguf package")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises whatever numpy raises on a malformed file
        raise ModelError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0]})",
                         "the file is truncated or corrupt; download or convert it again") from None


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_info(path: str | Path, with_hash: bool = True) -> dict:
    """What a report records about a GGUF source: file, architecture, file type, block formats, sha256."""
    import gguf

    path = Path(path).expanduser().resolve()
    reader = _reader(path)
    file_type = _field(reader, "general.file_type")
    try:
        type_name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        type_name = str(file_type)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    info = {"format": "gguf", "path": str(path), "bytes": path.stat().st_size,
            "architecture": _field(reader, "general.architecture"), "name": _field(reader, "general.name"),
            "file_type": type_name, "tensor_types": dict(sorted(counts.items()))}
    if with_hash:
        info["sha256"] = sha256(path)
    return info


def load_dtype(path: Path) -> torch.dtype:
    """The dtype a GGUF model is held in when the caller keeps "its own": bf16 if the file stores bf16
    tensors, else fp16 (what llama.cpp's converter writes for float tensors); block formats have none."""
    reader = _reader(path)
    return torch.bfloat16 if any(t.tensor_type.name == "BF16" for t in reader.tensors) else torch.float16


def _config_overrides(path: Path) -> dict:
    """Hyperparameters the GGUF holds but transformers' GGUF config mapping drops: a head size other than
    hidden/heads (Qwen3's 128 at hidden 1024 and 16 heads) is read from `{arch}.attention.key_length`."""
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    key, hidden, heads = (_field(reader, f"{arch}.{k}") for k in ("attention.key_length", "embedding_length",
                                                                  "attention.head_count"))
    return {"head_dim": int(key)} if key and hidden and heads and key != hidden // heads else {}


def load_gguf(path: str | Path, dtype: torch.dtype | None, with_tokenizer: bool = True):
    """(dense transformers model on CPU, tokenizer or None) from a GGUF file; dtype None: `load_dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(path).expanduser().resolve()
    info = gguf_info(path, with_hash=False)        # one-line errors for missing, foreign and corrupt files
    dtype = dtype or load_dtype(path)
    try:
        with _silent_dequantize():
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True),
                **_config_overrides(path))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if with_tokenizer else None
    except (ValueError, KeyError, NotImplementedError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"transformers cannot build a causal LM from {path.name} (architecture "
                         f"{info['architecture']!r}): {first}",
                         "use a GGUF of an architecture transformers reads (llama, mistral, qwen2/3, phi3, ...), "
                         "or the original safetensors model") from None
    detach_quantizer(model)
    return model.eval(), tokenizer


@contextmanager
def _silent_dequantize():
    """transformers' GGUF reader draws a tqdm bar of its own, outside its progress-bar switch; calq draws its own."""
    import transformers.modeling_gguf_pytorch_utils as reader

    saved = getattr(reader, "tqdm", None)
    reader.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        reader.tqdm = saved


def detach_quantizer(model) -> None:
    """Make a dequantized GGUF model an ordinary dense one: transformers refuses to save (and calq's writer
    would record) a model that still carries its GGUF quantizer and quantization_config."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
