"""Seconds of `calq compress` on one machine with 1 and N ranks (`--nproc N`: torch.distributed, gloo on CPU).

The machine's threads are split between the ranks (OMP_NUM_THREADS = threads // ranks), so the table compares the
same cores used by one process or by several. Each rank calibrates on its share of the batches and solves its share
of each block's Linears; every rank still runs every block forward on its share and holds the whole model (or one
block, with --offload disk), so speed-up needs cores to spare. With a different thread count per process, fp32 GEMMs
sum in another order, so the checkpoints of different rows may differ in a few codes: the last column counts them.

    python benchmarks/distributed.py                      # zoo:smollm2, GPTQ W4 g64, 32×512, ranks 1 and 2
    python benchmarks/distributed.py --model zoo:llama --num-samples 16 --seq-len 128 --ranks 1,2,4
    python benchmarks/distributed.py --threads-per-rank 1     # same threads per process: identical checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


def _differing(a: dict, b: dict) -> int:
    return sum(int((a[k] != b[k]).sum()) for k in a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:smollm2")
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads split between the ranks")
    ap.add_argument("--threads-per-rank", type=int, help="the same threads in every row instead (then the "
                    "checkpoints match exactly)")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    recipe = {"model": args.model, "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len,
                                                   "batch_size": args.batch_size},
              "stages": [{"method": "gptq", "bits": 4, "group_size": args.group_size}]}
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "recipe.yaml").write_text(json.dumps(recipe))
        for n in (int(x) for x in args.ranks.split(",")):
            threads = args.threads_per_rank or max(1, args.threads // n)
            out = tmp / f"ranks{n}"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                   "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            cmd = [sys.executable, "-m", "calq", "compress", str(tmp / "recipe.yaml"), "-o", str(out), "--no-eval",
                   "--device", "cpu", *(["--nproc", str(n)] if n > 1 else [])]
            t = time.time()
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.time() - t
            if run.returncode:
                sys.exit(run.stderr)
            timings = json.loads((out / "report.json").read_text())["timings"]
            tensors = _tensors(out)
            first = first or (n, tensors)
            rows.append((n, threads, timings["compress"], wall, _differing(first[1], tensors),
                         sum(v.numel() for v in tensors.values()), timings["phases"]))
    base = rows[0][2]
    threads = f"{args.threads_per_rank} threads per rank" if args.threads_per_rank else f"{args.threads} threads"
    print(f"{args.model}, GPTQ W4 g{args.group_size}, {args.num_samples}×{args.seq_len} calibration "
          f"(batches of {args.batch_size}), {threads} on {os.cpu_count()} cores, torch {torch.__version__}\n")
    # rank 0's phases: forwards and Hessians shrink with its share of the batches, solves with its share of the
    # Linears; what is left of them is the reduction, the broadcasts and waiting for the slowest rank
    print(f"| ranks | threads/rank | compress s | wall s | vs first row | forward s | Hessians s | solves s | "
          f"propagate s | elements ≠ ranks={rows[0][0]} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, threads, comp, wall, diff, total, ph in rows:
        print(f"| {n} | {threads} | {comp:.1f} | {wall:.1f} | {base / comp:.2f}× | "
              f"{ph['stats_forward'] - ph['stats_accumulate']:.1f} | {ph['stats_accumulate']:.1f} | "
              f"{ph['methods']:.1f} | {ph['propagate']:.1f} | {diff} of {total} |")


if __name__ == "__main__":
    main()
