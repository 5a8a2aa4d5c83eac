"""Perplexity under quantized KV caches: fp16, KIVI-style, per-token, XQuant and XQuant-CL at 4/3/2 bits.

Every row scores the same windows (the GPTQ protocol: non-overlapping windows, teacher forcing) with every
token's K and V taken from the quantized cache (`calq evaluate --kv-cache METHOD:BITS` runs the same code).
Models: zoo:smollm2 (GQA 9/3), the same model with its k/v heads repeated into an MHA model (9/9: the same
function, so XQuant's MHA path runs on real activations; its "fp16 KV" is then the 9-head KV) and zoo:llama
(GQA 4/2, 4 blocks: there the Table 4 setting leaves one layer at b bits, so it also runs without base layers).

    python benchmarks/xquant_table.py [--seq-len 2048] [--windows 2] [--models smollm2,smollm2-mha,llama]
    python benchmarks/xquant_table.py --diagnose        # per-layer K/V error on the sink token vs the others
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from calq.api import kv_cache_applied
from calq.calibration.data import evaluation_windows, load_text
from calq.calibration.loading import load_model
from calq.eval.perplexity import perplexity
from calq.methods.xquant import KVCacheSpec, fake_quantize

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
ROWS = [None] + [f"{m}:{b}" for m in ("kivi", "token", "xquant", "xquant-cl") for b in (4, 3, 2)]


def mha_from_gqa(model):
    """The same function with every K/V head repeated for the query heads that share it (num_kv_heads = heads)."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    cfg.num_key_value_heads = cfg.num_attention_heads
    mha = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    state = model.state_dict()
    hd = model.config.head_dim
    for k, v in state.items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            state[k] = v.view(-1, hd, v.shape[-1]).repeat_interleave(g, 0).reshape(-1, v.shape[-1])
    mha.load_state_dict(state, strict=False)
    mha.tie_weights()
    return mha.eval()


def load(name: str):
    ref = "zoo:smollm2" if name.startswith("smollm2") else f"zoo:{name}"
    model, tok, _ = load_model(ref)
    return (mha_from_gqa(model) if name.endswith("-mha") else model), tok


def table(args) -> list[dict]:
    out = []
    for name in args.models.split(","):
        model, tok = load(name)
        seq = min(args.seq_len, model.config.max_position_embeddings)
        windows = args.windows * args.seq_len // seq          # the same number of tokens at a shorter context
        data = {spec: evaluation_windows(load_text(spec, "evaluation"), tok, seq, windows)
                for spec in (str(WIKI), "stdlib:test")}
        bases = (3, 0) if name == "llama" else (3,)
        for base in bases:
            for row in ROWS:
                if row is None and base != bases[0]:
                    continue
                spec = None if row is None else KVCacheSpec.parse(row, base_layers=base)
                rec = {"model": name, "seq_len": seq, "base_layers": base if spec else None,
                       "cache": row or "fp16"}
                t = time.time()
                with kv_cache_applied(model, spec) as summary:
                    for ds, w in data.items():
                        rec[Path(ds).name if ds.startswith("/") else ds] = perplexity(model, w, batch_size=1)
                rec["windows"] = windows
                rec["kv_cache_ratio"] = summary["kv_cache_ratio"] if summary else 1.0
                rec["seconds"] = round(time.time() - t, 1)
                print(json.dumps(rec), flush=True)
                out.append(rec)
    return out


def markdown(rows: list[dict]) -> str:
    """One line per (model, cache); perplexity and its change against the same model's fp16 row."""
    lines = ["| model | cache | layers at 4 bits | KV size vs fp16 | WikiText-2 ppl | Δ | stdlib:test ppl | Δ |",
             "|---|---|---|---|---|---|---|---|"]
    fp16 = {r["model"]: r for r in rows if r["cache"] == "fp16"}
    for r in rows:
        f = fp16[r["model"]]
        d = [f"{100 * (r[k] / f[k] - 1):+.1f}%" if r is not f else "" for k in ("wiki.test.raw", "stdlib:test")]
        base = "-" if r["base_layers"] is None else str(r["base_layers"])
        lines.append(f"| {r['model']} | {r['cache']} | {base} | {r['kv_cache_ratio']:.3f} | "
                     f"{r['wiki.test.raw']:.2f} | {d[0]} | {r['stdlib:test']:.2f} | {d[1]} |")
    return "\n".join(lines)


def ablation_markdown(rows: list[dict], table: list[dict]) -> str:
    ref = {r["cache"]: r for r in table if r["model"] == "smollm2" and r["base_layers"] in (3, None)}
    lines = ["| cache (Table 4 setting) | variant | KV size vs fp16 | WikiText-2 ppl | without it (main table) |",
             "|---|---|---|---|---|"]
    for r in rows:
        var = "channel 0 of the latents fp16" if r.get("keep_channel0_fp16") else "token 0 (sink) exact"
        base = ref.get(r["cache"])
        lines.append(f"| {r['cache']} | {var} | {r['kv_cache_ratio']:.3f} | {r['wiki.test.raw']:.2f} | "
                     f"{base['wiki.test.raw']:.2f} |" if base else "| - |")
    return "\n".join(lines)


@torch.no_grad()
def diagnose(args) -> None:
    """On one window: the sink token's X against the others'; X's outlier channels and the 4-bit error of X per
    token vs the SVD latents (some layers); relative error of K and V (pre-RoPE) per layer at 3 bits without base
    layers, each layer's streams quantized from the model's own X, on the window's first token (SmolLM2's
    attention sink) and on the others."""
    from calq.eval.kv_cache import KVRuntime

    model, tok = load(args.models.split(",")[0])
    w = evaluation_windows(load_text(str(WIKI), "evaluation"), tok, args.seq_len, 1)
    xs = {}
    hooks = [a.self_attn.register_forward_pre_hook(lambda m, a, kw, i=i: xs.__setitem__(i, kw["hidden_states"]),
                                                   with_kwargs=True) for i, a in enumerate(model.model.layers)]
    model(w, use_cache=False)
    for h in hooks:
        h.remove()
    print("sink token: max|X| / median over others' max|X|, per layer:",
          [round(float(xs[i][0, 0].abs().max() / xs[i][0, 1:].abs().amax(-1).median()), 1) for i in sorted(xs)])
    from calq.methods.xquant import Stream, svd_factors

    def rel(a, b):
        return round(float((a - b).norm() / b.norm()), 3)

    for i in (0, 3, 8, 15, 22, 29):     # X's outlier channels and 4-bit errors, token 0 left out
        X = xs[i][:, 1:].float()
        cmax = X.abs().amax(1)[0]
        top = cmax.topk(4)
        attn = model.model.layers[i].self_attn
        K, V = attn.k_proj(X), attn.v_proj(X)
        Xq = fake_quantize(X, Stream("x", X.shape[-1], 4, "token"), 128)
        f = svd_factors(attn.k_proj.weight, attn.v_proj.weight, False)
        d_kv = f["U_k"].shape[1]
        Kl = fake_quantize(X @ f["U_k"], Stream("xu_k", d_kv, 4, "channel"), 128) @ f["F_k"]
        Vl = fake_quantize(X @ f["U_v"], Stream("xu_v", d_kv, 4, "token"), 128) @ f["F_v"]
        print(f"layer {i}: channel max|X| top 4 {[round(v, 1) for v in top.values.tolist()]} at "
              f"{top.indices.tolist()}, median {float(cmax.median()):.2f}; 4-bit relative error, X per token: "
              f"X {rel(Xq, X)} K {rel(attn.k_proj(Xq), K)} V {rel(attn.v_proj(Xq), V)}; SVD latents: "
              f"K {rel(Kl, K)} V {rel(Vl, V)}")
    for row in [f"{m}:3" for m in ("kivi", "token", "xquant", "xquant-cl")]:
        rt = KVRuntime(model, KVCacheSpec.parse(row, base_layers=0))
        acc, errs = None, []
        for c in rt.codecs:
            X = xs[c.index].float()
            K, V = c.k_proj(X), c.v_proj(X)
            vals = c.encode(X, acc)
            hats = [fake_quantize(v, s, rt.spec.group_size) for v, s in zip(vals, c.streams, strict=True)]
            Kh, Vh, acc = c.decode(hats, acc)
            e = [float((a[0, sl] - b[0, sl]).norm() / b[0, sl].norm()) for a, b in ((Kh, K), (Vh, V))
                 for sl in (slice(0, 1), slice(1, None))]
            errs.append([round(x, 3) for x in e])
        print(row, "per layer [K sink, K others, V sink, V others]:", errs)


@contextmanager
def sink_exact(on: bool):
    """Diagnostic only (not a calq option): every stream's token 0 (the attention sink) is kept unquantized and
    left out of its groups' ranges; the other tokens are quantized as usual."""
    import calq.eval.kv_cache as kv

    if not on:
        yield
        return
    fq = kv.fake_quantize

    def patched(x, stream, G):
        return torch.cat([x[:, :1], fq(x[:, 1:], stream, G)], 1)

    kv.fake_quantize = patched
    try:
        yield
    finally:
        kv.fake_quantize = fq


ABLATIONS = [("xquant:2", {"keep_channel0_fp16": True}, False), ("xquant-cl:3", {"keep_channel0_fp16": True}, False),
             ("xquant-cl:2", {"keep_channel0_fp16": True}, False), ("kivi:3", {}, True), ("xquant:3", {}, True),
             ("xquant-cl:3", {}, True), ("kivi:2", {}, True), ("xquant-cl:2", {}, True)]


def ablate(args) -> list[dict]:
    """smollm2, WikiText-2 only, the table's windows: channel 0 of the SVD latents in fp16 (the spec's App. B
    option), and token 0 kept exact (diagnostic), at the Table 4 setting."""
    model, tok = load("smollm2")
    w = evaluation_windows(load_text(str(WIKI), "evaluation"), tok, args.seq_len, args.windows)
    out = []
    for row, kw, sink in ABLATIONS:
        spec = KVCacheSpec.parse(row, **kw)
        with kv_cache_applied(model, spec) as summary, sink_exact(sink):
            ppl = perplexity(model, w, batch_size=1)
        rec = {"model": "smollm2", "cache": row, **kw, "sink_token_exact": sink, "wiki.test.raw": ppl,
               "kv_cache_ratio": summary["kv_cache_ratio"], "seq_len": args.seq_len, "windows": args.windows}
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,smollm2-mha,llama")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--ablate", action="store_true", help="smollm2: channel 0 fp16, sink token exact")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--markdown-from", default=None, help="TABLE.json[,ABLATE.json]: print the tables, run nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.markdown_from:
        files = [json.loads(Path(f).read_text()) for f in args.markdown_from.split(",")]
        print(markdown(files[0]))
        if len(files) > 1:
            print("\n" + ablation_markdown(files[1], files[0]))
        return
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if args.diagnose:
        diagnose(args)
        return
    if args.ablate:
        rows = ablate(args)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        return
    rows = table(args)
    print(f"load average at end: {os.getloadavg()}")
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
