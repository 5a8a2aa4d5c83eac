"""Perplexity / size / time / memory table over a grid of methods, bits and layouts on a zoo model.

Each cell is one `calq compress` process (so peak RSS is that run's), scored on stdlib:test and, when present,
WikiText-2 raw test from ../shared/data. Prints a Markdown table.

    python benchmarks/quality_table.py --grid core       # dense, RTN/GPTQ W4/W3/W2 (per-OC)
    python benchmarks/quality_table.py --grid layouts    # RTN/GPTQ x per-OC/per-IC/AdaDim at W3 and W4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
GRIDS = {
    "core": [(m, b, "oc") for m in ("rtn", "gptq") for b in (4, 3, 2)],
    "layouts": [(m, b, lay) for b in (4, 3) for m in ("rtn", "gptq") for lay in ("oc", "ic", "adadim")],
    "layouts-w4": [(m, 4, lay) for m in ("rtn", "gptq") for lay in ("oc", "ic", "adadim")],
    "layouts-w3": [(m, 3, lay) for m in ("rtn", "gptq") for lay in ("oc", "ic", "adadim")],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=GRIDS, default="core")
    ap.add_argument("--model", default="zoo:llama")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--work", default="runs/quality")
    args = ap.parse_args()
    work = Path(args.work) / args.grid
    work.mkdir(parents=True, exist_ok=True)
    datasets = ["stdlib:test"] + ([str(WIKI)] if WIKI.is_file() else [])
    rows = []
    for method, bits, layout in GRIDS[args.grid]:
        name = f"{method}-w{bits}g128-{layout}"
        stage = {"method": method, "bits": bits, "group_size": 128, "layout": layout}
        recipe = {"model": args.model, "calibration": {"num_samples": args.num_samples, "seq_len": 512},
                  "stages": [stage],
                  "evaluation": {"datasets": datasets, "seq_len": 512, "max_windows": args.max_windows}}
        (work / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        out = work / name
        subprocess.run(["calq", "compress", str(work / f"{name}.yaml"), "-o", str(out), "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
        rep = json.loads((out / "report.json").read_text())
        rows.append((name, rep))
        print(f"done {name}", file=sys.stderr, flush=True)

    ds_names = ["stdlib:test"] + (["wikitext2"] if len(datasets) > 1 else [])
    head = "| config | " + " | ".join(f"ppl {d}" for d in ds_names) + \
        " | bits/weight | checkpoint MiB | compress s | peak RSS GiB | ic/oc layers |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    first = rows[0][1]
    dense = " | ".join(f"{e['baseline_ppl']:.3f}" for e in first["evaluation"])
    print(f"| dense fp16 | {dense} | 16 | {first['dense_bytes'] / 2**20:.2f} | - | - | - |")
    for name, rep in rows:
        ppl = " | ".join(f"{e['ppl']:.3f}" for e in rep["evaluation"])
        n_ic = sum(m["layout"] == "ic" for m in rep["modules"])
        print(f"| {name} | {ppl} | {rep['bits_per_weight']:.3f} | {rep['checkpoint_bytes'] / 2**20:.2f} | "
              f"{rep['timings']['compress']:.1f} | {rep['peak_rss_bytes'] / 2**30:.2f} | "
              f"{n_ic}/{len(rep['modules']) - n_ic} |")


if __name__ == "__main__":
    main()
