"""Run llm-compressor's GPTQ (symmetric int4 weights, static act-order) on a local model with pre-tokenized
calibration windows (its own venv). --group-size 128 is its W4A16 preset; 64 for models such as SmolLM2 (576)."""

from __future__ import annotations

import argparse
import time

from datasets import load_dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("calibration_jsonl")
ap.add_argument("out")
ap.add_argument("--group-size", type=int, default=128)
args = ap.parse_args()
ds = load_dataset("json", data_files=args.calibration_jsonl, split="train")
t0 = time.time()
oneshot(model=args.model, dataset=ds, output_dir=args.out, num_calibration_samples=len(ds),
        max_seq_length=len(ds[0]["input_ids"]),
        recipe=GPTQModifier(ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                            config_groups={"group_0": {"targets": ["Linear"], "weights": {
                                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                "group_size": args.group_size, "actorder": "static"}}}))
print(f"llmcompressor_seconds {time.time() - t0:.2f}")
