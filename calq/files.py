"""Reading the files users hand calq: text, JSON, safetensors headers, and the weights read from them.

Each reader turns a malformed or unreadable file into one `CalqError` naming the file, where it is read, so no
caller needs a catch-all. Nothing here (or anywhere in calq) unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from calq.errors import CalqError, ModelError


def read_text(path: Path, error: type[CalqError] = CalqError, fix: str = "give a UTF-8 text file") -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})", fix) from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}", "check the path and its permissions") from None


def read_json(path: Path, error: type[CalqError] = ModelError,
              fix: str = "the file is damaged; write or download it again") -> dict:
    """A JSON object from `path`."""
    text = read_text(path, error, fix)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path} is not valid JSON ({getattr(e, 'msg', 'nested too deeply')})", fix) from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object", fix)
    return data


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """`safe_open` on a file whose header has been validated (truncated, corrupt, oversized ones are refused)."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), "pt")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({str(e).strip() or type(e).__name__})",
                         "the file is truncated or corrupt; write or download it again") from None
    with handle as st:
        yield st


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Refuse weights with NaN or inf: they come from the model's files, so say so before any work blames them
    on compression."""
    for name, t in tensors:
        if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all():
            raise ModelError(f"{name} of {source} holds non-finite values (NaN or inf): the input model is broken",
                             "re-download or re-convert the model; calq reads it as stored")
