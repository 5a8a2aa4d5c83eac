"""Greedy generation under real caches: bytes held and tokens per second, on CPU.

Caches: transformers' DynamicCache (the model's dtype), calq's packed XCache (calq/eval/kv_cache.py: integer codes
packed 8 to `bits` bytes, fp16 scale and min per group, fp16 window of per-channel streams, int64 position ids;
K and V rematerialized per layer at every step) and transformers' QuantizedCache with the quanto and HQQ backends
(where importable). Each (context, cache) runs `model.generate` on the first CONTEXT tokens of WikiText-2 raw test
with min = max = NEW new tokens; a logits processor stamps the time of every step, so the prefill (first stamp) and
the decoding rate (the remaining NEW-1 steps) are separated. Bytes are counted after generation, over every tensor
the cache holds (tensor subclasses through their inner tensors, shared storage once).

    python benchmarks/xquant_generate.py [--model zoo:smollm2] [--contexts 1024,4096] [--new 16]
    python benchmarks/xquant_generate.py --check     # 16-bit XQuant/XQuant-CL XCache vs DynamicCache tokens
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, QuantizedCache

from calq.calibration.loading import load_model
from calq.eval.kv_cache import KVRuntime
from calq.methods.xquant import KVCacheSpec

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CACHES = ["dynamic", "xquant:4", "xquant-cl:3", "xquant-cl:2", "kivi:2", "quanto:4", "quanto:2", "hqq:4", "hqq:2"]


class Stamps(LogitsProcessor):
    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every tensor reachable from obj (attributes, dicts, lists), each storage once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and \
                not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, n), seen) for n in names)
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen) for v in obj)
    return 0


def cache_bytes(cache) -> int:
    if hasattr(cache, "runtime"):                       # calq XCache: its own count (streams + positions)
        return cache.nbytes()["total"]
    total, seen = 0, set()
    for layer in cache.layers:
        total += held_bytes({k: v for k, v in vars(layer).items() if k not in ("quantizer", "optimizer")}, seen)
    return total


def make_cache(name: str, model):
    """(cache, runtime or None). calq caches patch the attention: the caller removes the runtime afterwards."""
    if name == "dynamic":
        return DynamicCache(config=model.config), None
    method, _, bits = name.partition(":")
    if method in ("quanto", "hqq"):
        # transformers' defaults for the axes (quanto 0/0, hqq 1/1 as its docs advise), G 64, 128 fp residual
        axis = 0 if method == "quanto" else 1
        return QuantizedCache(method, model.config, nbits=int(bits), axis_key=axis, axis_value=axis,
                              q_group_size=64, residual_length=128), None
    rt = KVRuntime(model, KVCacheSpec.parse(name))
    rt.install()
    return rt.new_cache(), rt


@torch.no_grad()
def run(model, ids: torch.Tensor, name: str, new: int) -> dict:
    stamps = Stamps()
    try:
        cache, rt = make_cache(name, model)
    except (ImportError, ValueError) as e:
        return {"cache": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    try:
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache=cache,
                             logits_processor=LogitsProcessorList([stamps]))
        t1 = time.perf_counter()
        n = cache_bytes(cache)
    finally:
        if rt is not None:
            rt.remove()
    steps = stamps.t
    return {"cache": name, "context": ids.shape[1], "new": new, "bytes": n,
            "prefill_s": round(steps[0] - t0, 2), "decode_tok_s": round((len(steps) - 1) / (steps[-1] - steps[0]), 3),
            "total_s": round(t1 - t0, 1), "tokens": out[0, ids.shape[1]:].tolist(),
            "kv_cache_ratio": rt.summary()["kv_cache_ratio"] if rt else None}


def fp16_kv_bytes(model, tokens: int) -> int:
    c = model.config
    return 2 * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * tokens


def markdown(rows: list[dict], model) -> str:
    lines = [f"| context | cache | bytes held | vs DynamicCache ({str(model.dtype).removeprefix('torch.')}) | "
             "vs fp16 K/V | prefill s | decode tok/s | greedy tokens equal to DynamicCache's |",
             "|---|---|---|---|---|---|---|---|"]
    dyn = {r["context"]: r for r in rows if r["cache"] == "dynamic" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('context', '-')} | {r['cache']} | not run: {r['error']} | | | | | |")
            continue
        d = dyn.get(r["context"])
        fp16 = fp16_kv_bytes(model, r["context"] + r["new"] - 1)
        vs = f"{r['bytes'] / d['bytes']:.3f}" if d else "-"
        same = "-" if d is None or r is d else \
            f"{sum(a == b for a, b in zip(r['tokens'], d['tokens'], strict=True))}/{r['new']}"
        lines.append(f"| {r['context']} | {r['cache']} | {r['bytes'] / 2**20:.2f} MiB | {vs} | "
                     f"{r['bytes'] / fp16:.3f} | {r['prefill_s']} | {r['decode_tok_s']} | {same} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:smollm2")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--caches", default=",".join(CACHES))
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="16-bit XCache greedy tokens vs DynamicCache's")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown-from", default=None, help="comma-separated --out files: print their table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load average at start: {os.getloadavg()}", flush=True)
    model, tok, _ = load_model(args.model)
    model.eval()
    if args.markdown_from:          # one table from earlier runs' --out files
        print(markdown([r for f in args.markdown_from.split(",") for r in json.loads(Path(f).read_text())], model))
        return
    text = tok(WIKI.read_text(), return_tensors="pt")["input_ids"]
    if args.check:
        ids = text[:, :1024]
        ref = run(model, ids, "dynamic", args.new)["tokens"]
        for name in ("xquant:16", "xquant-cl:16", "kivi:16", "token:16"):
            got = run(model, ids, name, args.new)["tokens"]
            print(json.dumps({"cache": name, "context": 1024, "new": args.new, "equal": got == ref}), flush=True)
        return
    for name in args.caches.split(","):      # warm-up: quanto builds its CPU kernels on first use
        run(model, text[:, :32], name, 2)
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids = text[:, :ctx]
        for name in args.caches.split(","):
            r = run(model, ids, name, args.new)
            print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
            rows.append(r)
    print(f"load average at end: {os.getloadavg()}")
    md = markdown(rows, model)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
