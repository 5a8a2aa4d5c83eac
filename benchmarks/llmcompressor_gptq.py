"""Run llm-compressor's GPTQ W4A16 g128 on a local model with pre-tokenized calibration windows (its own venv)."""

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
args = ap.parse_args()
ds = load_dataset("json", data_files=args.calibration_jsonl, split="train")
t0 = time.time()
oneshot(model=args.model, dataset=ds, output_dir=args.out, num_calibration_samples=len(ds),
        max_seq_length=len(ds[0]["input_ids"]),
        recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], block_size=128,
                            dampening_frac=0.01, actorder="static"))
print(f"llmcompressor_seconds {time.time() - t0:.2f}")
