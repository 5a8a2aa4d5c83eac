"""llama.cpp's own round-to-nearest against calq's GPTQ on the same GGUF block formats, on zoo:smollm2.

Rows: the dense model as f16 GGUF; Q4_0, Q4_1 and Q8_0 rounded by the gguf package (llama.cpp's reference
quantizers, as `llama-quantize` without an importance matrix); calq GPTQ with `scheme: q4_0` / `q8_0`, exported
with `calq export --format gguf`. Embeddings and output head are Q8_0 in every quantized file, so sizes compare.
Each file is scored by `calq evaluate FILE.gguf` (transformers dequantizes it; the papers' protocol) on WikiText-2
raw test at 2048 and 512 tokens, and by llama.cpp itself (llama-cpp-py-sync; its own logits, activations rounded
as its kernels do) on the first 2048-token window; llama.cpp's prompt and generation speed on this CPU too.

    python benchmarks/gguf_table.py [--num-samples 32] [--windows-2048 8] [--windows-512 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
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


def calq_gguf(work: Path, scheme: str, args) -> tuple[Path, float]:
    import yaml

    recipe = {"model": "zoo:smollm2",
              "calibration": {"dataset": str(VALID) if VALID.is_file() else "stdlib:train",
                              "num_samples": args.num_samples, "seq_len": 512},
              "stages": [{"method": "gptq", "scheme": scheme}], "output": {"format": "gguf"}}
    (work / f"{scheme}.yaml").write_text(yaml.safe_dump(recipe))
    out = work / f"calq-{scheme}"
    t = time.time()
    subprocess.run(["calq", "compress", str(work / f"{scheme}.yaml"), "-o", str(out), "--overwrite", "--no-eval"],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "model.gguf", time.time() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--windows-2048", type=int, default=8)
    ap.add_argument("--windows-512", type=int, default=16)
    ap.add_argument("--work", default="runs/gguf")
    args = ap.parse_args()
    from llama_cpp_runtime import runtime

    from calq.api import evaluate, load_model
    from calq.calibration.data import evaluation_windows, load_text

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok, _ = load_model("zoo:smollm2", dtype=torch.float32)
    files: dict[str, tuple[Path, float | None]] = {}
    from calq.export.gguf import write_gguf

    write_gguf(model, tok, work / "dense-f16.gguf", "f16")
    files["dense f16"] = (work / "dense-f16.gguf", None)
    for name in ("Q4_0", "Q4_1", "Q8_0"):
        t = time.time()
        rtn_gguf(model, tok, work / f"rtn-{name}.gguf", getattr(gguf.GGMLQuantizationType, name))
        files[f"llama.cpp RTN {name}"] = (work / f"rtn-{name}.gguf", time.time() - t)
    for scheme in ("q4_0", "q8_0"):
        files[f"calq GPTQ -> {scheme.upper()}"] = calq_gguf(work, scheme, args)

    llama_cpp, why = runtime(Path(tempfile.mkdtemp(prefix="llama_cpp-")))
    wiki = str(WIKI) if WIKI.is_file() else "stdlib:test"
    ids = evaluation_windows(load_text(wiki), tok, 2048, 1)[0].tolist()
    rows = []
    for name, (path, seconds) in files.items():
        p2048 = evaluate(str(path), [wiki], seq_len=2048, max_windows=args.windows_2048, device="cpu")[0]["ppl"]
        p512 = evaluate(str(path), [wiki], seq_len=512, max_windows=args.windows_512, device="cpu")[0]["ppl"]
        lc = {}
        if llama_cpp is not None:
            req = path.with_suffix(".request.json")
            req.write_text(json.dumps({"ids": ids, "prompt": ids[:512], "new": 64}))
            env = {**os.environ, **({"PYTHONPATH": llama_cpp} if llama_cpp else {})}
            r = subprocess.run([sys.executable, str(ROOT / "tests/export/llama_cpp_probe.py"), str(path), str(req)],
                               capture_output=True, text=True, env=env)
            lc = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
        rows.append((name, path.stat().st_size, seconds, p2048, p512, lc))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"zoo:smollm2; WikiText-2 raw test: {args.windows_2048} windows of 2048 and {args.windows_512} of 512 "
          f"(calq evaluate FILE.gguf); llama.cpp: its own logits on the first 2048-token window ({why})")
    print("| file | MiB | make s | ppl 2048 | ppl 512 | llama.cpp ppl 2048 | prompt tok/s | gen tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size, seconds, p2048, p512, lc in rows:
        s = f"{seconds:.0f}" if seconds else "-"
        lcp = f"{lc['ppl']:.2f}" if lc else "-"
        speed = (f"{lc['prompt_tokens_per_s']:.0f} | {lc['tokens_per_s']:.1f}" if lc else "- | -")
        print(f"| {name} | {size / 2**20:.1f} | {s} | {p2048:.2f} | {p512:.2f} | {lcp} | {speed} |")
    assert all(math.isfinite(r[3]) for r in rows)


if __name__ == "__main__":
    main()
