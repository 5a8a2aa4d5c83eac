"""Evaluation through the head a chunk of tokens at a time: the same numbers, without [batch, T, vocab] logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from calq.eval import perplexity as P


def _tiny(tokenizer, vocab=None, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=2048, **cfg)
    return LlamaForCausalLM(config).eval()


def _full_losses(model, windows, batch_size):
    with torch.no_grad():
        return torch.cat([P.window_loss(w, model(input_ids=w).logits) for w in windows.split(batch_size)])


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_losses_equal_the_full_logits(tokenizer, monkeypatch, tie):
    model = _tiny(tokenizer, tie_word_embeddings=tie)
    windows = torch.randint(0, len(tokenizer), (5, 64))
    monkeypatch.setattr(P, "LOGIT_CHUNK_BYTES", 4 * len(tokenizer) * 50)        # 50 tokens a chunk: 7 chunks
    head = P.Head(model, windows[:1])
    assert head.chunked and head.chunk_tokens() == 50
    got = P.window_losses(model, windows, batch_size=2)
    assert torch.allclose(got, _full_losses(model, windows, 2), rtol=1e-6, atol=1e-6)


def test_a_head_that_transforms_logits_falls_back_to_the_full_path(tokenizer):
    model = _tiny(tokenizer)
    forward = model.forward

    def capped(*a, **k):                # a soft-capped head, as Gemma 2 has: not the output embedding alone
        out = forward(*a, **k)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.forward = capped
    windows = torch.randint(0, len(tokenizer), (3, 32))
    assert not P.Head(model, windows[:1]).chunked
    assert torch.allclose(P.window_losses(model, windows, batch_size=2), _full_losses(model, windows, 2))


def test_streamed_kl_equals_the_precomputed_one(tokenizer, monkeypatch):
    a, b = _tiny(tokenizer), _tiny(tokenizer)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.02 * torch.randn_like(p))
    windows = torch.randint(0, len(tokenizer), (4, 48))
    monkeypatch.setattr(P, "LOGIT_CHUNK_BYTES", 4 * len(tokenizer) * 40)
    streamed = P.kl_to_reference(b, windows, a, batch_size=3)
    stored = P.kl_to_reference(b, windows, P.next_token_logprobs(a, windows, batch_size=3), batch_size=3)
    assert streamed > 0 and streamed == pytest.approx(stored, rel=1e-5)
    assert P.kl_to_reference(a, windows, a, batch_size=3) == pytest.approx(0.0, abs=1e-7)


BIG_VOCAB = 152064      # Qwen2's


def _peak_rss(args) -> tuple[int, dict]:
    """Peak RSS (bytes) of a fresh `calq evaluate` process, and its JSON row.

    VmHWM, not getrusage's ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss across
    exec, so inside a long pytest run ru_maxrss reports the test runner's size, not the command's."""
    code = ("import json, re, sys; from typer.testing import CliRunner; from calq.cli.main import app; "
            f"r = CliRunner().invoke(app, {args!r}); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)); "
            "print(json.dumps({'rss': hwm * 1024, 'out': r.output, 'code': r.exit_code}))")
    res = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert res["code"] == 0, res["out"]
    return res["rss"], json.loads(res["out"].strip().splitlines()[-1])


@pytest.mark.slow
def test_152k_vocabulary_at_2048_stays_within_1_5_gb_of_its_weights(tmp_path, tokenizer):
    """A Qwen2-sized vocabulary (the zoo tokenizer's ids are a subset): batch 8 × 2048 × 152064 fp32 logits
    would be 10 GB, and as much again for log_softmax; chunked scoring holds 256 MiB of them."""
    model = _tiny(tokenizer, vocab=BIG_VOCAB)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    weights = sum(p.numel() for p in model.parameters()) * 4
    base = ["evaluate", str(tmp_path / "m"), "--seq-len", "2048", "--max-windows", "8", "--json", "--device", "cpu"]
    rss, row = _peak_rss(base)
    rss_ref, row_ref = _peak_rss(base + ["--reference", str(tmp_path / "m")])
    assert row["windows"] == 8 and row_ref["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    # above the interpreter + torch + transformers baseline (~0.5 GB) and the fp32 weights (2 copies with --reference)
    assert rss - weights < 1.5 * 2**30 + 0.6 * 2**30, rss / 2**30
    # with --reference both models' chunks (logits and log-probabilities) are live at once: one more 1 GiB budget
    # (measured 1.68 GB alone, 2.29 GB with --reference; unchunked, the pair would need about 20 GB)
    assert rss_ref - 2 * weights < 2.5 * 2**30 + 0.6 * 2**30, rss_ref / 2**30
