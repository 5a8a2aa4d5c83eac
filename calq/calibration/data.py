"""Dataset specs and token windows for calibration and evaluation.

A dataset spec is one string, accepted anywhere a dataset is named:
  stdlib | stdlib:train | stdlib:test   the embedded corpus (`stdlib` means the train split)
  PATH.txt | PATH.raw                   a local text file, joined as is
  PATH.jsonl | PATH.parquet             a local file whose rows have a `text` field (read with `datasets`)
  wikitext2[:split] | c4[:split]        Hugging Face hub datasets (needs network)
For hub datasets the default split depends on the role: `train` for calibration, `test`
(`validation` for c4) for evaluation, so calibration never silently reads evaluation text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from calq.calibration.corpus import stdlib_text
from calq.errors import DatasetError

TEXT_SUFFIXES = (".txt", ".raw")
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_DATASETS = {
    # name: (path, config, {role: default split}, valid splits)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calibration": "train", "evaluation": "test"},
                  ("train", "validation", "test")),
    "c4": ("allenai/c4", None, {"calibration": "train", "evaluation": "validation"}, ("train", "validation")),
}
SPEC_HELP = ("use stdlib, stdlib:train, stdlib:test, a .txt/.raw/.jsonl/.parquet file, "
             "or a hub name: " + ", ".join(HUB_DATASETS))


@dataclass(frozen=True)
class DatasetSpec:
    kind: str            # "stdlib" | "file" | "hub"
    name: str            # split name for stdlib, path for file, hub name for hub
    split: str | None = None

    def __str__(self) -> str:
        if self.kind == "file":
            return self.name
        return f"{self.name}:{self.split}" if self.split else self.name


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parse a dataset spec string; raise DatasetError naming the problem and the accepted forms."""
    spec = spec.strip()
    if not spec:
        raise DatasetError("empty dataset spec", SPEC_HELP)
    head, _, tail = spec.partition(":")
    if head == "stdlib":
        split = tail or "train"
        if split not in ("train", "test"):
            raise DatasetError(f"unknown stdlib split {split!r} in {spec!r}", "use stdlib:train or stdlib:test")
        return DatasetSpec("stdlib", "stdlib", split)
    if head in HUB_DATASETS:
        splits = HUB_DATASETS[head][3]
        if tail and tail not in splits:
            raise DatasetError(f"unknown split {tail!r} for {head}", f"use one of {', '.join(splits)}")
        return DatasetSpec("hub", head, tail or None)
    path = Path(spec).expanduser()
    if path.suffix in TEXT_SUFFIXES + TABLE_SUFFIXES or "/" in spec or path.exists():
        if not path.is_file():
            raise DatasetError(f"dataset file not found: {spec}", "check the path, or " + SPEC_HELP)
        if path.suffix not in TEXT_SUFFIXES + TABLE_SUFFIXES:
            raise DatasetError(f"unsupported dataset file type {path.suffix!r}: {spec}",
                               "use .txt/.raw (plain text) or .jsonl/.parquet with a `text` field")
        return DatasetSpec("file", str(path))
    raise DatasetError(f"unknown dataset {spec!r}", SPEC_HELP)


def load_text(spec: str | DatasetSpec, role: str = "evaluation") -> str:
    """All text of a dataset as one string (rows joined by a blank line)."""
    ds = spec if isinstance(spec, DatasetSpec) else parse_dataset_spec(spec)
    if ds.kind == "stdlib":
        text = stdlib_text(ds.split)
    elif ds.kind == "file":
        text = _read_file(Path(ds.name))
    else:
        text = _read_hub(ds, role)
    if not text.strip():
        raise DatasetError(f"dataset {ds} is empty", "point it at a file with text in it")
    return text


def _read_file(path: Path) -> str:
    if path.suffix in TEXT_SUFFIXES:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DatasetError(f"cannot read {path}: {e.strerror or e}", "check the path and its permissions") from None
    import datasets

    datasets.disable_progress_bars()        # calq draws its own; a bar here would be a second line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)     # its parse errors: reported below, once
    kind = "parquet" if path.suffix == ".parquet" else "json"
    try:
        rows = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a malformed file
        cause = e.__cause__ or e            # datasets wraps the parser's error in a generic one
        detail = " ".join(str(cause).split())[:200] or type(cause).__name__
        raise DatasetError(f"could not read {path} ({detail})", "check that the file is valid " + kind) from None
    if "text" not in rows.column_names:
        raise DatasetError(f"{path} has no `text` field (columns: {', '.join(rows.column_names)})",
                           "give each row a `text` field")
    texts = rows["text"]
    bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise DatasetError(f"{path}: row {bad + 1}'s `text` is a {type(texts[bad]).__name__}, not a string",
                           "give each row a `text` string")
    return "\n\n".join(t for t in texts if t)


def _read_hub(ds: DatasetSpec, role: str) -> str:
    import datasets

    path, config, defaults, _ = HUB_DATASETS[ds.name]
    split = ds.split or defaults[role]
    try:
        if ds.name == "c4":
            # Only the first shard of each split, as GPTQ-style evaluations do (formats.md §5).
            shard = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}[split]
            rows = datasets.load_dataset(path, data_files={split: shard}, split=split)
            if role == "evaluation":  # "c4-new": first 1100 validation documents
                rows = rows.select(range(min(1100, len(rows))))
            return " ".join(rows["text"])
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:
        raise DatasetError(f"could not load {ds.name} ({split}) from the Hugging Face hub: {type(e).__name__}",
                           "check the network, or use a local file or stdlib:test") from e
    return "\n\n".join(rows["text"])


def calibration_windows(text: str, tokenizer, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` token windows of `seq_len` cut at seeded random places of the text. [N, T] int64.

    Like GPTQ's C4 sampling: pick a random spot, tokenize a stretch there, take a random slice of it.
    Only what is needed is tokenized, so calibrating on a large corpus costs no more than on a small one.
    """
    rng = random.Random(seed)
    span = seq_len * 16  # characters: several times what seq_len tokens need for any sane tokenizer
    windows = []
    for _ in range(num_samples):
        for _attempt in range(20):
            start = rng.randrange(0, max(1, len(text) - span))
            ids = tokenizer(text[start:start + span], add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) > seq_len:
                off = rng.randrange(0, len(ids) - seq_len)
                windows.append(ids[off:off + seq_len])
                break
        else:
            raise DatasetError(f"calibration text is too short for seq_len {seq_len}",
                               "use a longer dataset or a smaller seq_len")
    return torch.tensor(windows, dtype=torch.long)


def evaluation_windows(text: str, tokenizer, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of the text tokenized once (GPTQ protocol, formats.md §5). [W, T] int64."""
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt", verbose=False)["input_ids"][0]
    n = ids.numel() // seq_len
    if n == 0:
        raise DatasetError(f"evaluation text has {ids.numel()} tokens, fewer than seq_len {seq_len}",
                           "use a longer dataset or a smaller --seq-len")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)
