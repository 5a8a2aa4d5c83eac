"""A one-block Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, random fp16 weights, the zoo
tokenizer) as a local folder, and a GPTQ W4 g128 recipe for it: what vs_llmcompressor.sh times on one real-size
block. Perplexity of random weights means nothing; the seconds do.

    python benchmarks/block_model.py runs/block7b      # writes runs/block7b/ and runs/block7b.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from calq.zoo import TOKENIZER_DIR

out = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
LlamaForCausalLM(cfg).half().save_pretrained(out)
tok.save_pretrained(out)
recipe = {"model": str(out), "calibration": {"dataset": "stdlib:train", "num_samples": 16, "seq_len": 512},
          "stages": [{"method": "gptq", "bits": 4, "group_size": 128}]}
out.with_suffix(".yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
print(f"wrote {out} and {out.with_suffix('.yaml')}")
