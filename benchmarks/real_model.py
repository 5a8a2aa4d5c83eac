"""The real-model table: every method on zoo:smollm2 (SmolLM2-135M-Instruct), as a user would look for it.

Each row is one `calq compress --no-eval` process (its seconds and peak RSS are that process's), calibrated on
WikiText-2 valid (`../shared/data/wikitext-2/valid.txt`; stdlib:train where it is absent), and the checkpoint read
back from disk is scored by this script on WikiText-2 raw test at 2048-token windows (the papers' protocol) and at
512, and on stdlib:test (out of domain for a WikiText calibration), plus KL(dense ‖ row) per token on the first
WikiText-2 512 windows: fidelity, which perplexity alone can hide (an error that shifts the model's confidence can
lower perplexity on one text while moving every prediction). Results are cached per row under --work, so an
interrupted run continues where it stopped; a cached row without KL gets it added. Prints a Markdown table (also
written to WORK/table.md).

    python benchmarks/real_model.py                       # every row (hours on 2 cores)
    python benchmarks/real_model.py --rows dense gptq-w3g64 gptq-w3g64+eora16
    python benchmarks/real_model.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VALID = SHARED / "wikitext-2" / "valid.txt"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"


def q(method, bits, group=64, **kw):
    return {"method": method, "bits": bits, "group_size": group, **kw}


def _rows() -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {"dense": []}
    for g in (64, 32):
        for m in ("rtn", "gptq"):
            for b in (4, 3, 2):
                rows[f"{m}-w{b}g{g}"] = [q(m, b, g)]
    for b in (4, 3):
        for m in ("rtn", "gptq"):
            for lay in ("ic", "adadim"):
                rows[f"{m}-w{b}g64-{lay}"] = [q(m, b, layout=lay)]
    for m in ("rtn", "gptq"):           # the AdaDim paper's setting is asymmetric (zero points on)
        rows[f"{m}-w3g64-asym"] = [q(m, 3, symmetric=False)]
        rows[f"{m}-w3g64-adadim-asym"] = [q(m, 3, layout="adadim", symmetric=False)]
    for b in (3, 2):
        for r in (16, 32):
            for basis in ("svd", "eora"):
                rows[f"gptq-w{b}g64+{basis}{r}"] = [q("gptq", b), {"method": "eora", "rank": r, "basis": basis}]
    rows["gptq-w2-perchannel"] = [q("gptq", 2, -1)]
    rows["ptq161"] = [{"method": "ptq161"}]
    rows["sparsegpt-2:4"] = [{"method": "prune", "sparsity": "2:4", "criterion": "sparsegpt"}]
    rows["sparsegpt-2:4+eora16"] = [*rows["sparsegpt-2:4"], {"method": "eora", "rank": 16}]
    rows["corda-ipa16+gptq-w4g64"] = [{"method": "corda", "rank": 16, "mode": "ipa"}, q("gptq", 4)]
    return rows


ROWS = _rows()


def evaluate(target: str, args) -> dict:
    from calq.api import evaluate as calq_evaluate

    out = {}
    sets = []
    if WIKI.is_file():
        sets += [("wiki2048", str(WIKI), 2048, args.windows_2048), ("wiki512", str(WIKI), 512, args.windows_512)]
    sets.append(("stdlib512", "stdlib:test", 512, args.windows_stdlib))
    for key, spec, seq, n in sets:
        r = calq_evaluate(target, [spec], seq_len=seq, max_windows=n, device=args.device, batch_size=4)[0]
        out[key] = {"ppl": r["ppl"], "windows": r["windows"]}
    return out


def kl_to_dense(target: str, args) -> dict:
    """KL(dense ‖ target) per token, in nats, on the first WikiText-2 512 windows (stdlib:test without them)."""
    from calq.api import evaluate as calq_evaluate

    spec = str(WIKI) if WIKI.is_file() else "stdlib:test"
    r = calq_evaluate(target, [spec], seq_len=512, max_windows=args.windows_kl, device=args.device, batch_size=4,
                      reference=args.model)[0]
    return {"kl": r["kl_to_reference"], "windows": r["windows"], "dataset": spec}


def run_row(name: str, args, work: Path) -> dict:
    cached = work / f"{name}.json"
    if cached.is_file():
        res = json.loads(cached.read_text())
        if "kl512" not in res and name != "dense":
            res["kl512"] = kl_to_dense(str(work / name), args)
            cached.write_text(json.dumps(res, indent=1))
        return res
    calib = str(VALID) if VALID.is_file() else "stdlib:train"
    if name == "dense":
        t = time.time()
        res = {"name": name, "ppl": evaluate(args.model, args), "bits_per_weight": 16.0, "seconds": None,
               "peak_rss_bytes": None, "eval_seconds": time.time() - t}
    else:
        recipe = {"model": args.model, "calibration": {"dataset": calib, "num_samples": args.num_samples,
                                                        "seq_len": args.seq_len, "seed": 0},
                  "stages": ROWS[name]}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = work / name
        subprocess.run(["calq", "compress", str(path), "-o", str(out), "--overwrite", "--no-eval",
                        "--device", args.device], check=True, stdout=subprocess.DEVNULL)
        rep = json.loads((out / "report.json").read_text())
        t = time.time()
        res = {"name": name, "ppl": evaluate(str(out), args), "bits_per_weight": rep["bits_per_weight"],
               "bits_per_weight_with_adapters": rep.get("bits_per_weight_with_adapters"),
               "checkpoint_bytes": rep["checkpoint_bytes"], "adapter_bytes": rep.get("adapter_bytes", 0),
               "seconds": rep["timings"]["compress"], "total_seconds": rep["timings"]["total"],
               "peak_rss_bytes": rep["peak_rss_bytes"], "kl512": kl_to_dense(str(out), args),
               "eval_seconds": time.time() - t,
               "ic_layers": sum(m["layout"] == "ic" for m in rep["modules"]), "modules": len(rep["modules"]),
               "threads": os.environ.get("OMP_NUM_THREADS"), "cpus": sorted(os.sched_getaffinity(0))}
    cached.write_text(json.dumps(res, indent=1))
    return res


def fmt(x: float) -> str:
    """2 decimals below 10⁴, else a·10ⁿ: W2 rows reach 10⁷."""
    if x < 1e4:
        return f"{x:.2f}"
    e = len(str(int(x))) - 1
    return f"{x / 10**e:.1f}·10{str(e).translate(str.maketrans('0123456789', '⁰¹²³⁴⁵⁶⁷⁸⁹'))}"


def table(results: list[dict], args) -> str:
    keys = [k for k in ("wiki2048", "wiki512", "stdlib512") if k in results[0]["ppl"]]
    names = {"wiki2048": f"WikiText-2 2048 ({args.windows_2048} w)",
             "wiki512": f"WikiText-2 512 ({args.windows_512} w)",
             "stdlib512": f"stdlib:test 512 ({args.windows_stdlib} w)"}
    head = "| row | " + " | ".join(names[k] for k in keys) + f" | KL to dense ({args.windows_kl} w of 512)" + \
        " | bits/weight (+adapters) | checkpoint MiB | compress s | peak RSS GiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = next((r for r in results if r["name"] == "dense"), None)
    for r in results:
        cells = []
        for k in keys:
            p = r["ppl"][k]["ppl"]
            ratio = f" (×{fmt(p / dense['ppl'][k]['ppl'])})" if dense and r is not dense else ""
            cells.append(f"{fmt(p)}{ratio}")
        cells.append(f"{r['kl512']['kl']:.3f}" if "kl512" in r else ("0" if r is dense else "-"))
        bpw = f"{r['bits_per_weight']:.3f}"
        if r.get("bits_per_weight_with_adapters") and r.get("adapter_bytes"):
            bpw += f" ({r['bits_per_weight_with_adapters']:.3f})"
        ck = f"{r['checkpoint_bytes'] / 2**20:.1f}" if r.get("checkpoint_bytes") else "-"
        s = f"{r['seconds']:.0f}" if r.get("seconds") else "-"
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f}" if r.get("peak_rss_bytes") else "-"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {bpw} | {ck} | {s} | {rss} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--model", default="zoo:smollm2")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows-2048", type=int, default=8)
    ap.add_argument("--windows-512", type=int, default=16)
    ap.add_argument("--windows-stdlib", type=int, default=8)
    ap.add_argument("--windows-kl", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="runs/real")
    args = ap.parse_args()
    if args.list:
        for name, stages in ROWS.items():
            print(f"{name}: {stages}")
        return
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; see --list")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = ["dense", *[r for r in args.rows if r != "dense"]]
    results = []
    for name in rows:
        t = time.time()
        results.append(run_row(name, args, work))
        print(f"done {name} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    text = table(results, args)
    (work / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
