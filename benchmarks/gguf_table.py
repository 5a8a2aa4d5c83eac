"""llama.cpp's own round-to-nearest against calq's GPTQ on the same GGUF block formats, on zoo:smollm2.

Rows: the dense model as f16 GGUF; Q4_0, Q4_1 and Q8_0 rounded by the gguf package (llama.cpp's reference
quantizers, as `llama-quantize` without an importance matrix); calq GPTQ with `scheme: q4_0 | q4_1 | q8_0`,
written by `output: {format: gguf}` (the same path as `calq export --format gguf`). Embeddings and output head
are Q8_0 in every quantized file, so sizes compare. Each file is scored by `calq evaluate FILE.gguf`
(transformers dequantizes it; the papers' protocol, formats.md §5) on WikiText-2 raw test at 2048 and 512 tokens,
and by llama.cpp itself (llama-cpp-py-sync; its own logits, activations rounded as its kernels do) on the first
2048-token window, with its prompt and generation speed on this CPU (--threads).

Results are kept per row in WORK/results.json, so an interrupted run resumes where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/gguf_table.py [--num-samples 32] [--windows-2048 4] [--windows-512 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import gguf
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VALID, WIKI = SHARED / "wikitext-2" / "valid.txt", SHARED / "wikitext-2-raw" / "wiki.test.raw"
sys.path.insert(0, str(ROOT / "tests" / "export"))


def rtn_gguf(model, tokenizer, path: Path, qtype) -> None:
    """Every Linear of the blocks rounded by the gguf package, as llama.cpp's quantizer does."""
    from calq.calibration.blocks import find_blocks, find_linears
    from calq.export.gguf import write_gguf

    prefix, blocks = find_blocks(model)
    raw = {}
    for i, b in enumerate(blocks):
        for name, mod in find_linears(b, f"{prefix}.{i}").items():
            raw[f"{name}.weight"] = (gguf.quants.quantize(mod.weight.detach().float().numpy(), qtype), qtype)
    write_gguf(model, tokenizer, path, "f16", blocks=raw, embeddings="q8_0")


def calq_gguf(work: Path, scheme: str, args) -> Path:
    import calq
    from calq.recipe.schema import validate_recipe

    recipe = {"model": "zoo:smollm2",
              "calibration": {"dataset": str(VALID) if VALID.is_file() else "stdlib:train",
                              "num_samples": args.num_samples, "seq_len": args.calib_seq_len},
              "stages": [{"method": "gptq", "scheme": scheme}], "output": {"format": "gguf"}}
    out = work / f"calq-{scheme}"
    calq.compress(validate_recipe(recipe), out, evaluate=False, overwrite=True, device="cpu")
    return out / "model.gguf"


def llama_cpp_probe(llama_cpp, path: Path, ids: list[int], args) -> dict:
    from llama_cpp_runtime import probe

    out = probe(llama_cpp, path, {"ids": ids, "prompt": ids[:512], "new": args.new, "threads": args.threads}, 3600)
    return {k: out[k] for k in ("ppl", "prompt_tokens_per_s", "tokens_per_s")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--windows-2048", type=int, default=4)
    ap.add_argument("--windows-512", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch's and llama.cpp's")
    ap.add_argument("--new", type=int, default=64, help="tokens llama.cpp generates for its speed")
    ap.add_argument("--work", default="runs/gguf")
    ap.add_argument("--rows", default="", help="comma-separated row names to (re)run; default: missing ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llama_cpp_runtime import runtime

    from calq.api import evaluate, load_model
    from calq.calibration.data import evaluation_windows, load_text
    from calq.export.gguf import write_gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    redo = set(filter(None, args.rows.split(",")))
    model, tok, _ = load_model("zoo:smollm2", dtype=torch.float32)
    wiki = str(WIKI) if WIKI.is_file() else "stdlib:test"
    ids = evaluation_windows(load_text(wiki), tok, 2048, 1)[0].tolist()
    llama_cpp, why = runtime(Path(tempfile.mkdtemp(prefix="llama_cpp-")))

    makers = {"dense f16": lambda p: write_gguf(model, tok, p, "f16")}
    for name in ("Q4_0", "Q4_1", "Q8_0"):
        makers[f"llama.cpp RTN {name}"] = \
            lambda p, q=getattr(gguf.GGMLQuantizationType, name): rtn_gguf(model, tok, p, q)
        makers[f"calq GPTQ {name}"] = lambda p, s=name.lower(): os.replace(calq_gguf(work, s, args), p)
    for name, make in makers.items():
        if name in results and name not in redo:
            continue
        path = work / (name.replace(" ", "-").replace(".", "") + ".gguf")
        t = time.time()
        make(path)
        row = {"bytes": path.stat().st_size, "make_s": time.time() - t}
        print(f"{name}: made in {row['make_s']:.0f} s", file=sys.stderr, flush=True)
        for seq, n in ((2048, args.windows_2048), (512, args.windows_512)):
            t = time.time()
            row[f"ppl_{seq}"] = evaluate(str(path), [wiki], seq_len=seq, max_windows=n, device="cpu")[0]["ppl"]
            print(f"{name}: ppl {seq} {row[f'ppl_{seq}']:.3f} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
        if llama_cpp is not None:
            row["llama_cpp"] = llama_cpp_probe(llama_cpp, path, ids, args)
            print(f"{name}: llama.cpp {row['llama_cpp']}", file=sys.stderr, flush=True)
        row["load"] = os.getloadavg()[0]
        results[name] = row
        store.write_text(json.dumps(results, indent=1))

    print(f"zoo:smollm2; WikiText-2 raw test ({wiki}): {args.windows_2048} windows of 2048 and {args.windows_512} "
          f"of 512 (`calq evaluate FILE.gguf`); GPTQ calibrated on {args.num_samples}x{args.calib_seq_len} tokens of "
          f"{VALID.name}; llama.cpp: its own logits on the first 2048-token window, speed with {args.threads} "
          f"thread(s), 512-token prompt, {args.new} generated ({why or 'llama-cpp-py-sync'})")
    print("| file | MiB | ppl 2048 | ppl 512 | llama.cpp ppl 2048 | prompt tok/s | gen tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name in makers:
        r = results.get(name)
        if r is None:
            continue
        lc = r.get("llama_cpp")
        lcs = f"{lc['ppl']:.2f} | {lc['prompt_tokens_per_s']:.0f} | {lc['tokens_per_s']:.1f}" if lc else "- | - | -"
        print(f"| {name} | {r['bytes'] / 2**20:.1f} | {r['ppl_2048']:.2f} | {r['ppl_512']:.2f} | {lcs} |")
    assert all(math.isfinite(r["ppl_2048"]) for r in results.values())


if __name__ == "__main__":
    main()
