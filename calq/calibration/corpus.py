"""The embedded `stdlib` corpus: the running interpreter's standard library, read at run time.

Documents are the `.py` files under the stdlib directory (site-packages excluded) plus each English topic
of `pydoc_data.topics`. The split is a stable hash of each document's name (its path relative to the stdlib
directory, or `pydoc_data.topics:<topic>`): sha256(name) mod 100 < 90 is `train`, the rest is `test`.
It does not depend on file order, the machine, or Python's hash seed, so a document never changes sides.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TRAIN_PERCENT = 90
SPLITS = ("all", "train", "test")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def split_of(name: str) -> str:
    """'train' or 'test' for a document name (stable across machines and runs)."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % 100
    return "train" if bucket < TRAIN_PERCENT else "test"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        # topics.py is the pydoc text as a Python literal: it enters once, as English, below.
        if rel.startswith("site-packages/") or rel == "pydoc_data/topics.py":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test files are deliberately not UTF-8
        if text.strip():
            docs.append(Document(rel, text))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        docs.append(Document(f"pydoc_data.topics:{key}", topics[key]))
    return tuple(docs)


def stdlib_documents(split: str = "all") -> list[Document]:
    """Documents of the stdlib corpus in a fixed order (sorted by name within the .py part)."""
    if split not in SPLITS:
        raise ValueError(f"unknown stdlib split {split!r}; use one of {SPLITS}")
    docs = _all_documents()
    if split == "all":
        return list(docs)
    return [d for d in docs if split_of(d.name) == split]


def stdlib_text(split: str = "all") -> str:
    """The split as one string, documents joined by a blank line (as WikiText rows are)."""
    return "\n\n".join(d.text for d in stdlib_documents(split))
