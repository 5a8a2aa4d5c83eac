"""Seconds and peak memory to GPTQ-quantize one Mixtral-shaped decoder block: attention and E experts.

Runs one MixtralDecoderLayer (random weights are fine for timing) through calq's block engine with its MoE
settings, so every expert projection is a target with its own Hessian of the tokens routed to it. Compare with
the dense block of benchmarks/gptq_block.py at the same token count.

    python benchmarks/moe_block.py                        # Mixtral-8x7B shape: hidden 4096, intermediate 14336
    python benchmarks/moe_block.py --hidden 1024 --intermediate 3584 --tokens 512
"""

from __future__ import annotations

import argparse
import time

import torch
from gptq_block import print_phases, random_inputs  # benchmarks/ is the script's folder, so on sys.path

from calq.calibration.engine import run_blocks
from calq.calibration.experts import CheckpointNames
from calq.calibration.moe import MoESettings
from calq.methods import METHODS
from calq.recipe.schema import validate_recipe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--all-experts", action="store_true", help="moe.calibrate_all_experts")
    ap.add_argument("--experts-per-pass", type=int, default=None, help="moe.experts_per_pass: Hessians of this "
                    "many experts per calibration forward (bounds memory; default all)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from accelerate import init_empty_weights
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
                        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                        max_position_embeddings=args.seq_len, vocab_size=128)
    with init_empty_weights():                  # the names and row ranges only need the architecture
        names = CheckpointNames(MixtralForCausalLM(cfg))
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    block = MixtralDecoderLayer(cfg, layer_idx=0)
    with torch.no_grad():                       # fused parameters are created uninitialised
        for p in block.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    block = block.to(dtype)
    blocks = torch.nn.ModuleList([block])
    inputs = random_inputs(MixtralRotaryEmbedding(cfg), args.tokens, args.seq_len, args.hidden, dtype)
    n_batches = len(inputs)
    recipe = validate_recipe({"stages": [{"method": "gptq", "bits": args.bits, "group_size": args.group_size}]})
    stages = [METHODS["gptq"](recipe.stages[0])]
    moe = MoESettings(names, calibrate_all_experts=args.all_experts, experts_per_pass=args.experts_per_pass)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_blocks(blocks, "model.layers", inputs, stages, dev, torch.float16, moe=moe)
    total = time.perf_counter() - t0

    print_phases(f"GPTQ W{args.bits} g{args.group_size}, one Mixtral block hidden {args.hidden} / intermediate "
                 f"{args.intermediate}, {args.experts} experts top-{args.top_k}, {n_batches * args.seq_len} tokens"
                 f"{' (all experts)' if args.all_experts else ''}, experts per pass {args.experts_per_pass or 'all'}, "
                 f"{dev}, {torch.get_num_threads()} threads",
                 result, total, dev)
    print(f"{len(result.modules)} modules quantized; tokens routed per expert: {result.expert_tokens}")
    experts = [m for m in result.modules if ".experts." in m.record.name]
    fell, damped = (sum(k in m.record.info for m in experts) for k in ("fallback", "few_tokens"))
    print(f"expert projections: {len(experts)}, {sum(m.seconds for m in experts):.1f} s of solves, "
          f"{fell} rounded without data, {damped} on a damped Hessian")


if __name__ == "__main__":
    main()
