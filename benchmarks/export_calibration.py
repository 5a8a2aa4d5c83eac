"""Write a recipe's calibration windows as JSON lines of token ids, so another tool calibrates on exactly them."""

from __future__ import annotations

import argparse
import json

from calq.api import load_model
from calq.calibration.data import calibration_windows, load_text
from calq.recipe.load import load_recipe

ap = argparse.ArgumentParser()
ap.add_argument("recipe")
ap.add_argument("out")
args = ap.parse_args()
recipe = load_recipe(args.recipe)
cal = recipe.calibration
_, tokenizer, _ = load_model(recipe.model)
ids = calibration_windows(load_text(cal.dataset, "calibration"), tokenizer, cal.num_samples, cal.seq_len, cal.seed)
with open(args.out, "w") as f:
    for row in ids.tolist():
        f.write(json.dumps({"input_ids": row, "attention_mask": [1] * len(row)}) + "\n")
print(f"wrote {ids.shape[0]} windows of {ids.shape[1]} tokens to {args.out}")
