"""Perplexity of low-rank compensation (none / svd / eora) over ranks, on GPTQ W3 g128 and on 2:4 pruning.

In-process (compress_model, no checkpoint written), scored on stdlib:test and, when present, WikiText-2 raw test.
Adapter overhead = r·(IC + OC) fp16 parameters per Linear, against the dense fp16 Linears.

    python benchmarks/compensation_table.py [--ranks 4 8 16 32] [--num-samples 64] [--max-windows 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from calq.api import compress_model, load_model
from calq.calibration.data import evaluation_windows, load_text
from calq.eval.perplexity import perplexity
from calq.recipe.schema import validate_recipe

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
BASES = {"gptq-w3g128": {"method": "gptq", "bits": 3, "group_size": 128},
         "prune-2:4": {"method": "prune", "sparsity": "2:4"}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES))
    args = ap.parse_args()
    _, tok, _ = load_model("zoo:llama")
    specs = ["stdlib:test"] + ([str(WIKI)] if WIKI.is_file() else [])
    windows = {s: evaluation_windows(load_text(s), tok, 512, args.max_windows) for s in specs}
    names = ["stdlib:test"] + (["wikitext2"] if WIKI.is_file() else [])

    def score(stages):
        model, tok_, dtype = load_model("zoo:llama")
        if stages:
            recipe = validate_recipe({"calibration": {"num_samples": args.num_samples, "seq_len": 512},
                                      "stages": stages})
            res = compress_model(model, tok_, recipe, torch.device("cpu"), dtype)
        else:
            res = None
        return [perplexity(model, w) for w in windows.values()], model, res

    dense, model, _ = score([])
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    dense_params = sum(m.weight.numel() for m in linears)
    print("| base | compensation | rank | " + " | ".join(f"ppl {n}" for n in names) + " | adapter overhead |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    print("| dense | - | - | " + " | ".join(f"{p:.3f}" for p in dense) + " | - |", flush=True)
    for base in args.bases:
        stage = BASES[base]
        ppl, _, _ = score([stage])
        print(f"| {base} | none | - | " + " | ".join(f"{p:.3f}" for p in ppl) + " | 0 |", flush=True)
        for r in args.ranks:
            for basis in ("svd", "eora"):
                ppl, _, res = score([stage, {"method": "eora", "rank": r, "basis": basis}])
                extra = sum(a.adapter.rank * sum(a.adapter.A.shape[1:]) + a.adapter.B.shape[0] * a.adapter.rank
                            for a in res.adapters)
                print(f"| {base} | {basis} | {r} | " + " | ".join(f"{p:.3f}" for p in ppl) +
                      f" | {100 * extra / dense_params:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
