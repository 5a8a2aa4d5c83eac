"""PTQ1.61 ablation on a zoo model, every cell a bundled recipe plus the stage overrides shown in its name.

    python benchmarks/ptq161_ablation.py                 # all rows, prints a Markdown table
    python benchmarks/ptq161_ablation.py --rows learned,preprocess

Rows: the 2-bit baselines (RTN and GPTQ W2 g128 per-OC), PTQ1.61 with the mask only (initial scales, no
training), with learned scales (max |x| and mean |x| masks), and with preprocessing. Each cell is one
`calq compress` process on the same calibration windows, scored on stdlib:test (and WikiText-2 when present).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"
ROWS = {   # name: (recipe, stage overrides)
    "rtn-w2g128": ("rtn-w4g128.yaml", {"bits": 2}),
    "gptq-w2g128": ("gptq-w2g128.yaml", {}),
    "mask-only": ("ptq161.yaml", {"learn": False}),
    "learned": ("ptq161.yaml", {}),
    "learned-mean": ("ptq161.yaml", {"statistic": "mean"}),
    "preprocess": ("ptq161-preprocess.yaml", {}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--work", default="runs/ptq161")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    datasets = ["stdlib:test"] + ([str(WIKI)] if WIKI.is_file() else [])
    rows = []
    for name in args.rows.split(","):
        recipe_file, over = ROWS[name]
        recipe = yaml.safe_load((ROOT / "recipes" / recipe_file).read_text())
        recipe["stages"][0].update(over)
        recipe["calibration"].update({"num_samples": args.num_samples, "seq_len": 512, "seed": 0})
        recipe["evaluation"] = {"datasets": datasets, "seq_len": 512, "max_windows": args.max_windows}
        recipe.pop("expect", None)
        (work / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        out = work / name
        subprocess.run([sys.executable, "-m", "calq.cli.main", "compress", str(work / f"{name}.yaml"), "-o",
                        str(out), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        rows.append((name, json.loads((out / "report.json").read_text())))
        print(f"done {name}", file=sys.stderr, flush=True)

    ds_names = ["stdlib:test"] + (["wikitext2"] if len(datasets) > 1 else [])
    head = "| config | " + " | ".join(f"ppl {d}" for d in ds_names) + \
        " | bits/weight | checkpoint MiB | compress s | peak RSS GiB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    first = rows[0][1]
    dense = " | ".join(f"{e['baseline_ppl']:.3f}" for e in first["evaluation"])
    print(f"| dense fp16 | {dense} | 16 | {first['dense_bytes'] / 2**20:.2f} | - | - |")
    for name, rep in rows:
        ppl = " | ".join(f"{e['ppl']:.3f}" for e in rep["evaluation"])
        print(f"| {name} | {ppl} | {rep['bits_per_weight']:.3f} | {rep['checkpoint_bytes'] / 2**20:.2f} | "
              f"{rep['timings']['compress']:.1f} | {rep['peak_rss_bytes'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
