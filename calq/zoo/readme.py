"""Render calq/zoo/README.md from each model's calq_zoo.json: `python -m calq.zoo.readme`."""

from __future__ import annotations

from calq.zoo import ZOO_DIR, zoo_info
from calq.zoo.specs import SEQ_LEN, ZOO

HEAD = f"""# calq zoo: offline demo models

Three small causal language models trained by calq's own script on the Python standard library of the
interpreter that ran it (`stdlib:train`: the stdlib `.py` sources plus `pydoc_data.topics`, 90 % of documents by
a sha256 hash of their path; `stdlib:test` is the other 10 %). They ship inside the package as standard
`save_pretrained` folders (fp16 safetensors, config, tokenizer) and load offline with
`AutoModelForCausalLM.from_pretrained(path)`; anywhere calq takes a model, `zoo:NAME` names one.

Tokenizer: byte-level BPE, 4096 entries, trained with `tokenizers` on `stdlib:train` (`calq/zoo/tokenizer`).
Training: fixed seed and step count, AdamW (β 0.9/0.95, weight decay 0.1), linear warmup then cosine decay to
10 %, bf16 autocast on 2 CPU threads, windows of {SEQ_LEN} tokens at seeded random offsets of the token stream
(documents joined by `<|endoftext|>`). The Mamba1 model trains through `calq.zoo.scan.chunked_selective_scan`
(closed form within chunks of 8 tokens, checked against the step-by-step recurrence and transformers' own scan in
`tests/zoo/test_scan.py`; transformers' reference scan trains at a few hundred tokens/s here). Every number
below is measured with transformers' own modules, not the training scan.

Perplexities: GPTQ protocol (text joined once, tokenized once, non-overlapping {SEQ_LEN}-token windows, fp32), on the
first 256 windows of each set. The unigram baseline is an add-one-smoothed unigram model of the same tokenizer fit
on `stdlib:train`, scored on the same windows. WikiText-2 is out of domain for a model that has only read Python.
"""


def render() -> str:
    lines = [HEAD, "| model | architecture | parameters | fp16 size | tokens seen | train time | final train loss |"
             " ppl stdlib:test | unigram ppl | ppl WikiText-2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    samples = []
    for name, spec in ZOO.items():
        info = zoo_info(name)
        if not info:
            lines.append(f"| zoo:{name} | {spec.arch} | not built | | | | | | | |")
            continue
        size = sum(f.stat().st_size for f in (ZOO_DIR / name).glob("*.safetensors"))
        lines.append(f"| zoo:{name} | {spec.arch} | {info['parameters'] / 1e6:.2f}M | {size / 2**20:.1f} MiB | "
                     f"{info['tokens_seen'] / 1e6:.2f}M | {info['train_seconds'] / 60:.1f} min | "
                     f"{info['final_train_loss']:.3f} | {info['ppl_stdlib_test']:.2f} | "
                     f"{info['unigram_ppl_stdlib_test']:.1f} | {info.get('ppl_wikitext2_test', float('nan')):.1f} |")
        samples.append(f"### zoo:{name}\n\n`{info['command']}` — {spec.steps} steps x {spec.batch_size} x "
                       f"{SEQ_LEN} tokens, lr {spec.lr}, seed {spec.seed}; config `{spec.config}`. "
                       + " ".join(spec.notes) + f"\n\nGreedy continuation of `def fibonacci(n):`:\n\n```python\n"
                       f"{info['sample']}\n```\n")
    lines += ["", "Wall times were measured while other work shared the 2 cores, so they overstate a quiet run.",
              "", "## Per model", ""] + samples
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (ZOO_DIR.parent / "README.md").write_text(render())
