"""The bundled demo models (`zoo:llama`, `zoo:mamba`, `zoo:mamba2`), shipped inside the package."""

from __future__ import annotations

import json
from pathlib import Path

from calq.errors import ModelError
from calq.zoo.specs import ZOO

ZOO_DIR = Path(__file__).parent / "models"
TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
INFO_FILE = "calq_zoo.json"  # training record written by `calq zoo train`


def zoo_path(name: str) -> Path:
    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}", f"use one of: {', '.join('zoo:' + n for n in ZOO)}")
    path = ZOO_DIR / name
    if not (path / "config.json").is_file():
        raise ModelError(f"zoo model {name!r} is not built in this install ({path})",
                         f"train it with `calq zoo train {name}`")
    return path


def resolve_model(ref: str) -> str:
    """`zoo:NAME` -> the bundled folder; anything else (a directory or hub id) is returned unchanged."""
    if ref.startswith("zoo:"):
        return str(zoo_path(ref[4:]))
    return ref


def zoo_info(name: str) -> dict:
    """The training record of a bundled model (empty if it has none)."""
    f = ZOO_DIR / name / INFO_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
