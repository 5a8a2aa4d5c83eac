"""`calq zoo train NAME`: train a demo model on `stdlib:train`, reproducibly, on a CPU.

Fixed seed, fixed step count (from calq.zoo.specs), bf16 autocast (about 5x faster than fp32 here), AdamW
with warmup and cosine decay. The result is a standard `save_pretrained` folder (fp16 safetensors, config,
tokenizer) plus `calq_zoo.json` recording the command, tokens seen, time, loss and held-out perplexity.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from calq.calibration.corpus import stdlib_documents
from calq.calibration.data import evaluation_windows, load_text
from calq.eval.perplexity import perplexity, unigram_perplexity
from calq.export.staging import staged
from calq.zoo import INFO_FILE, TOKENIZER_DIR, ZOO_DIR
from calq.zoo.specs import SEQ_LEN, VOCAB_SIZE, ZOO

EOT = "<|endoftext|>"
EVAL_WINDOWS = 256  # held-out windows scored in the training record (131k tokens at SEQ_LEN 512)
WIKITEXT = Path(__file__).resolve().parents[2].parent / "shared/data/wikitext-2-raw/wiki.test.raw"
SAMPLE_PROMPT = "def fibonacci(n):"


def train_tokenizer(out_dir: Path = TOKENIZER_DIR) -> None:
    """Byte-level BPE with VOCAB_SIZE entries trained on stdlib:train."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d.text for d in stdlib_documents("train")), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   model_max_length=SEQ_LEN)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


def load_tokenizer():
    from transformers import AutoTokenizer

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        train_tokenizer()
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def token_stream(tokenizer, split: str = "train") -> torch.Tensor:
    """All documents of a stdlib split tokenized and joined by an end-of-text token. [N] int64."""
    texts = [d.text for d in stdlib_documents(split)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eot = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eot)], dtype=torch.long)


def build_model(name: str):
    import transformers

    spec = ZOO[name]
    cls = getattr(transformers, spec.arch)
    config = cls.config_class(**spec.config, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(spec.seed)
    return cls(config)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    # 1) linear warmup, 2) cosine decay to 10% of the peak
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(name: str, out_dir: Path | None = None, steps: int | None = None, log=print) -> dict:
    spec = ZOO[name]
    steps = steps or spec.steps
    out_dir = Path(out_dir or ZOO_DIR / name)
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer()
    stream = token_stream(tokenizer, "train")
    log(f"{name}: {stream.numel():,} training tokens in stdlib:train")
    model = build_model(name).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    scan = contextlib.nullcontext()
    if spec.arch == "MambaForCausalLM":
        from calq.zoo.scan import use_chunked_scan
        scan = use_chunked_scan()
    t0 = time.time()
    losses = []
    with scan:
        for step in range(steps):
            starts = torch.randint(0, stream.numel() - SEQ_LEN, (spec.batch_size,), generator=gen)
            x = torch.stack([stream[s:s + SEQ_LEN] for s in starts.tolist()])   # [B, T]
            for group in opt.param_groups:
                group["lr"] = _lr(step, steps, spec.lr, spec.warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 50 == 0 or step == steps - 1:
                el = time.time() - t0
                log(f"{name} step {step + 1}/{steps} loss {loss.item():.3f} "
                    f"{(step + 1) * spec.batch_size * SEQ_LEN / el:.0f} tok/s elapsed {el:.0f}s")
    wall = time.time() - t0
    model.eval()

    test_windows = evaluation_windows(load_text("stdlib:test"), tokenizer, SEQ_LEN, EVAL_WINDOWS)
    info = {
        "name": name, "architecture": spec.arch, "parameters": n_params,
        "command": f"calq zoo train {name}" + (f" --steps {steps}" if steps != spec.steps else ""),
        "seed": spec.seed, "steps": steps, "batch_size": spec.batch_size, "seq_len": SEQ_LEN, "lr": spec.lr,
        "tokens_seen": steps * spec.batch_size * SEQ_LEN, "train_seconds": round(wall, 1),
        "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "eval_windows": int(test_windows.shape[0]),
        "ppl_stdlib_test": round(perplexity(model, test_windows), 3),
        "unigram_ppl_stdlib_test": round(unigram_perplexity(stream, test_windows, VOCAB_SIZE), 3),
        "notes": spec.notes,
    }
    if WIKITEXT.is_file():
        wiki = evaluation_windows(WIKITEXT.read_text(encoding="utf-8"), tokenizer, SEQ_LEN, EVAL_WINDOWS)
        info["ppl_wikitext2_test"] = round(perplexity(model, wiki), 3)
    ids = tokenizer(SAMPLE_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    info["sample"] = tokenizer.decode(out[0], skip_special_tokens=True)
    log(json.dumps(info, indent=2))

    # Write beside the target, then swap it in, so a failed run never leaves half a model.
    with staged(out_dir, overwrite=True) as tmp:
        model.half().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info
