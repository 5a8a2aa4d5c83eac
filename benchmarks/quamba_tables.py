"""Quamba ablation on zoo:mamba and the Quamba2 precisions on zoo:mamba2, every row read back from disk.

Mamba1 rows come from recipes/quamba-w8a8.yaml with only the stage changed: naive static W8A8 (min-max
everywhere: `percentile: null, hadamard: false`), + percentile clipping of u, + Hadamard on y (= Quamba).
Mamba2 rows are recipes/quamba2-{w8a8,w4a8,w4a16}.yaml as written. fp16 = the dense model on the same windows.
bits/weight = stored bytes of the quantized mixers (codes, scales, fp16 leftovers) over their parameter count.

    python benchmarks/quamba_tables.py [--only mamba|mamba2] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import calq
from calq.api import load_model
from calq.calibration.data import evaluation_windows, load_text
from calq.eval.perplexity import perplexity
from calq.recipe.load import RECIPES_DIR, load_recipe

MAMBA1 = [("naive static W8A8", {"percentile": None, "hadamard": False}),
          ("+ percentile clipping", {"percentile": 0.99999, "hadamard": False}),
          ("+ Hadamard (= Quamba)", {"percentile": 0.99999, "hadamard": True})]
MAMBA2 = ["quamba2-w8a8", "quamba2-w4a8", "quamba2-w4a16"]


def _row(label, recipe, out: Path, windows) -> dict:
    t = time.time()
    report = calq.compress(recipe, out, evaluate=False, overwrite=True)
    seconds = time.time() - t
    ppl = perplexity(calq.load(out), windows)
    return {"label": label, "ppl": ppl, "bpw": report.bits_per_weight,
            "mb": report.checkpoint_bytes / 2**20, "seconds": seconds}


def _table(title, base_ppl, dense_mb, rows) -> str:
    lines = [f"### {title}", "", "| | ppl | vs fp16 | bits/weight (mixers) | checkpoint MiB | compress s |",
             "|---|---|---|---|---|---|", f"| fp16 | {base_ppl:.3f} | – | 16 | {dense_mb:.2f} | – |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {100 * (r['ppl'] / base_ppl - 1):+.2f} % | "
                     f"{r['bpw']:.2f} | {r['mb']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["mamba", "mamba2"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="quamba-tables-"))
    parts = []
    if args.only in (None, "mamba"):
        base = load_recipe(RECIPES_DIR / "quamba-w8a8.yaml")
        parts.append(_run("zoo:mamba (Mamba1): Quamba ablation, W8A8", base, out, [
            (label, load_recipe(RECIPES_DIR / "quamba-w8a8.yaml", {"stages": [{"method": "quamba", **st}]}))
            for label, st in MAMBA1]))
    if args.only in (None, "mamba2"):
        base = load_recipe(RECIPES_DIR / "quamba2-w8a8.yaml")
        parts.append(_run("zoo:mamba2 (Mamba2, n_groups 2): Quamba2", base, out, [
            (name.split("-")[1].upper(), load_recipe(RECIPES_DIR / f"{name}.yaml")) for name in MAMBA2]))
    print("\n\n".join(parts))


def _run(title, base, out, variants) -> str:
    model, tok, _ = load_model(base.model)
    ev = base.evaluation
    windows = evaluation_windows(load_text(ev.datasets[0]), tok, ev.seq_len, ev.max_windows)
    base_ppl = perplexity(model, windows)
    dense_mb = sum(p.numel() for p in model.parameters()) * 2 / 2**20
    rows = []
    for i, (label, recipe) in enumerate(variants):
        rows.append(_row(label, recipe, out / f"{base.model[4:]}-{i}", windows))
        print(rows[-1], flush=True)
    return _table(f"{title} — {ev.datasets[0]}, {windows.shape[0]}×{ev.seq_len} tokens, "
                  f"calibration {base.calibration.num_samples}×{base.calibration.seq_len}", base_ppl, dense_mb, rows)


if __name__ == "__main__":
    main()
