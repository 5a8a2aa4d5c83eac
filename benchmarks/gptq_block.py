"""Seconds and peak memory to GPTQ-quantize one decoder block of a real model shape.

Runs one LlamaDecoderLayer (random weights are fine for timing) through calq's own block engine, so the
numbers include hooks, Hessian accumulation, the solve and the propagation pass, split by phase.

    python benchmarks/gptq_block.py                      # Llama-2-7B shape: hidden 4096, intermediate 11008
    python benchmarks/gptq_block.py --hidden 2048 --intermediate 5504 --tokens 4096 --device cuda
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from rich.console import Console
from rich.table import Table

from calq.calibration.engine import run_blocks
from calq.eval.report import peak_rss_bytes
from calq.methods import METHODS
from calq.recipe.schema import validate_recipe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (seq_len 2048 windows)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="measure this machine's GEMM and Cholesky speed and print the floor they allow")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top operators by self CPU time")
    args = ap.parse_args()

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.seq_len)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    block = LlamaDecoderLayer(cfg, layer_idx=0).to(dtype)
    blocks = torch.nn.ModuleList([block])
    inputs = random_inputs(LlamaRotaryEmbedding(cfg), args.tokens, args.seq_len, args.hidden, dtype)
    n_batches = len(inputs)
    recipe = validate_recipe({"stages": [{"method": "gptq", "bits": args.bits, "group_size": args.group_size}]})
    stages = [METHODS["gptq"](recipe.stages[0])]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else nullcontext()
    t0 = time.perf_counter()
    with prof:
        result = run_blocks(blocks, "model.layers", inputs, stages, dev, torch.float16)
    total = time.perf_counter() - t0
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    print_phases(f"GPTQ W{args.bits} g{args.group_size}, one block hidden {args.hidden} / intermediate "
                 f"{args.intermediate}, {n_batches * args.seq_len} tokens, {dev}, {torch.get_num_threads()} threads",
                 result, total, dev)
    for m in result.modules:
        print(f"  {m.record.name:40s} {m.seconds:7.2f}s  rel_error {m.rel_error:.4f}")
    if args.floor:
        parts = floor(args.hidden, args.intermediate, n_batches * args.seq_len, args.seq_len, dev)
        t = Table(title=f"the floor this machine allows ({torch.get_num_threads()} threads)")
        for c in ("part", "seconds"):
            t.add_column(c, justify="right" if c == "seconds" else "left")
        for name, sec in parts.items():
            t.add_row(name, f"{sec:.2f}")
        Console().print(t)
        print(f"block {total:.1f} s against a floor of {parts['floor']:.1f} s: {total / parts['floor']:.2f}x")


def _seconds(fn, reps: int = 3) -> float:
    fn()                                    # warm-up: allocation, thread pool
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def floor(d: int, f: int, tokens: int, seq_len: int, dev: torch.device) -> dict[str, float]:
    """What the block's work costs at this machine's measured fp32 GEMM rate and Cholesky speed.

    Two block forwards (statistics, propagation): 2·T·(4d² + 3df) for the Linears and 4·S·d per token for
    attention (S: window; full, not causal, as SDPA computes it on CPU). Hessians: 2·T·IC² for each of the four
    distinct inputs (d three times, f once). GPTQ's updates: OC·IC² per Linear (each column's error times the
    rest of its row). Plus one inverse Cholesky per distinct input, timed as calq computes it.
    """
    from calq.methods.gptq import inverse_cholesky

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a, b = torch.randn(2048, d, device=dev), torch.randn(d, d, device=dev)
    gemm = 2 * 2048 * d * d / _seconds(lambda: (a @ b, sync()))           # FLOP/s
    chol = {}
    for n in sorted({d, f}):
        X = torch.randn(2 * n, n, device=dev)
        H = X.t() @ X / (2 * n)
        chol[n] = _seconds(lambda H=H: (inverse_cholesky(H, 0.01, 1), sync()), reps=1)
    forward = 2 * tokens * (4 * d * d + 3 * d * f) + 4 * tokens * seq_len * d
    hessians = 2 * tokens * (3 * d * d + f * f)
    solves = 4 * d * d * d + 2 * f * d * d + d * f * f
    out = {"fp32 GEMM rate (GFLOP/s, measured)": gemm / 1e9,
           "two block forwards": 2 * forward / gemm, "Hessians": hessians / gemm, "GPTQ updates": solves / gemm,
           "inverse Choleskys (3 of d, 1 of f; measured)": 3 * chol[d] + chol[f]}
    out["floor"] = sum(v for k, v in out.items() if not k.startswith("fp32"))
    return out


def random_inputs(rotary, tokens: int, seq_len: int, hidden: int, dtype: torch.dtype) -> list:
    """Random block inputs [(hidden [1, T, D], kwargs)], windows of seq_len covering `tokens`."""
    pos = torch.arange(seq_len)[None]
    cos, sin = rotary(torch.zeros(1, dtype=dtype), pos)
    return [(torch.randn(1, seq_len, hidden, dtype=dtype),
             {"position_embeddings": (cos, sin), "position_ids": pos, "attention_mask": None})
            for _ in range(max(1, tokens // seq_len))]


def print_phases(title: str, result, total: float, dev: torch.device) -> None:
    """The engine's time per phase as a table, then peak memory."""
    t = Table(title=title)
    t.add_column("phase")
    t.add_column("seconds", justify="right")
    t.add_column("share", justify="right")
    ph = result.phase_seconds
    rows = [("calibration forward (excl. Hessian)", ph["stats_forward"] - ph["stats_accumulate"]),
            ("Hessian accumulation", ph["stats_accumulate"]), ("GPTQ solve (+ rel. error)", ph["methods"]),
            ("propagation forward", ph["propagate"])]
    for name, s in rows:
        t.add_row(name, f"{s:.2f}", f"{100 * s / total:.1f}%")
    t.add_row("total", f"{total:.2f}", "100%")
    Console().print(t)
    print(f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB" +
          (f", peak CUDA {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if dev.type == "cuda" else ""))


if __name__ == "__main__":
    main()
