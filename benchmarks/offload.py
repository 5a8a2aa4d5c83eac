"""Peak RSS and seconds of `calq.compress` with weights in RAM (`--offload cpu`) and on disk (`--offload disk`).

Each mode runs in its own process, since ru_maxrss is a per-process peak. "imports" is the RSS once torch,
transformers and calq are imported, before the model is read: the part of the peak that no offload can save.

    python benchmarks/offload.py                                   # zoo:llama (10 MB), RTN W4
    python benchmarks/offload.py --random-llama 1024,8 --no-eval   # a random 8-block Llama, hidden 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from calq import api
from calq.recipe.schema import validate_recipe

def rss():
    from calq.eval.report import peak_rss_bytes     # VmHWM: ru_maxrss carries the parent's RSS across exec
    return peak_rss_bytes()

recipe, out, mode, evaluate = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
imports = rss()
t = time.time()
report = api.compress(validate_recipe(recipe), out, offload=mode, device="cpu", evaluate=evaluate)
print(json.dumps({"mode": report.offload, "seconds": time.time() - t, "imports": imports, "peak": rss(),
                  "timings": {k: v for k, v in report.timings.items() if isinstance(v, float)},
                  "ppl": [(e.baseline_ppl, e.ppl) for e in report.evaluation]}))
"""


# A randomly initialised fp16 Llama (hidden, blocks) with the zoo tokenizer. Built in a child process too: a
# child forked from a parent that held the model would inherit its RSS high-water mark.
MAKE_RANDOM = """
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from calq.zoo import TOKENIZER_DIR

hidden, blocks = (int(x) for x in sys.argv[1].split(","))
tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                  num_hidden_layers=blocks, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                  max_position_embeddings=2048, tie_word_embeddings=False)
torch.manual_seed(0)
LlamaForCausalLM(cfg).half().save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
"""


def _child(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    return out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:llama")
    ap.add_argument("--random-llama", metavar="HIDDEN,BLOCKS", help="benchmark a random Llama of this shape")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))       # this checkout's calq, here and in the children

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if args.random_llama:
            model = str(tmp / "model")
            _child(MAKE_RANDOM, args.random_llama, model)
        recipe = {"model": model,
                  "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len, "batch_size": 4},
                  "evaluation": {"seq_len": args.seq_len, "max_windows": 16, "batch_size": 4},
                  "stages": [{"method": args.method, "bits": 4, "group_size": 128}]}
        rows = [json.loads(_child(CHILD, json.dumps(recipe), str(tmp / f"out-{mode}"), mode,
                                  "0" if args.no_eval else "1").strip().splitlines()[-1]) for mode in ("cpu", "disk")]
        size = sum(f.stat().st_size for f in (tmp / "out-cpu").glob("*.safetensors"))
        from calq.api import resolve_model
        from calq.calibration.offload import weights_bytes

        dense = weights_bytes(Path(resolve_model(model)))

    mib = 2 ** 20
    print(f"model {args.random_llama and f'random Llama {args.random_llama}' or model}: "
          f"{dense / mib:.1f} MiB of weights, checkpoint {size / mib:.1f} MiB; {args.method} W4 g128, "
          f"{args.num_samples}x{args.seq_len} calibration tokens, evaluation {'off' if args.no_eval else 'on'}")
    print(f"{'offload':8} {'seconds':>8} {'peak RSS MiB':>13} {'imports MiB':>12} {'peak - imports':>15}  phases (s)")
    for r in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items() if k != "total")
        print(f"{r['mode']:8} {r['seconds']:8.1f} {r['peak'] / mib:13.0f} {r['imports'] / mib:12.0f} "
              f"{(r['peak'] - r['imports']) / mib:15.0f}  {phases}")
    if rows[0]["ppl"]:
        print(f"perplexity (dense, compressed): cpu {rows[0]['ppl']}, disk {rows[1]['ppl']}")


if __name__ == "__main__":
    main()
