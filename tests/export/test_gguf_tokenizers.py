"""GGUF tokenizers and architectures beyond GPT-2 BPE / Llama, checked by llama.cpp itself: it must tokenize as the
Hugging Face tokenizer does, and compute the model's logits."""

from __future__ import annotations

import math

import pytest
import torch
from llama_cpp_runtime import probe  # tests/export is on sys.path (pytest prepend import mode)
from tiny_tokenizers import SAMPLES, byte_bpe, sentencepiece_bpe
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from calq.calibration.data import load_text
from calq.errors import CalqError
from calq.export.gguf import write_gguf


@pytest.fixture(scope="module")
def text() -> str:
    return load_text("stdlib:train")[:400_000]


def tiny(cls, config_cls, vocab: int, **kw):
    """A random 2-block model whose norms and biases are not their defaults (so a dropped tensor shows)."""
    torch.manual_seed(0)
    model = cls(config_cls(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1) if p.dim() == 1 else p.mul_(2.0)
    return model


def llama_cpp_tokens(llama_cpp, tok, tmp_path, texts) -> list[list[int]]:
    model = tiny(LlamaForCausalLM, LlamaConfig, len(tok))
    write_gguf(model, tok, tmp_path / "t.gguf")
    return probe(llama_cpp, tmp_path / "t.gguf", {"texts": texts})["tokens"]


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2", "sentencepiece"])
def test_llama_cpp_tokenizes_as_the_tokenizer_does(kind, text, tmp_path, llama_cpp):
    tok = sentencepiece_bpe(text) if kind == "sentencepiece" else byte_bpe(kind, text)
    texts = [*SAMPLES, text[5000:7000]]
    got = llama_cpp_tokens(llama_cpp, tok, tmp_path, texts)
    for t, ids in zip(texts, got, strict=True):
        assert ids == tok(t)["input_ids"], (kind, t[:40])
    if kind == "sentencepiece":         # the samples reach the byte fallback and the BOS the file asks for
        assert tok.convert_tokens_to_ids("<0xF0>") in got[2] and all(ids[0] == tok.bos_token_id for ids in got)


def test_metaspace_sentencepiece_differs_only_before_leading_spaces(text, tmp_path, llama_cpp):
    """transformers' Metaspace(prepend_scheme=first) skips the ▁ it prepends when the text starts with a space;
    llama.cpp (add_space_prefix) and SentencePiece itself always prepend it: one ▁ more, nothing else."""
    tok = sentencepiece_bpe(text, legacy=False)
    texts = [*SAMPLES, text[5000:7000]]
    got = llama_cpp_tokens(llama_cpp, tok, tmp_path, texts)
    space = tok.convert_tokens_to_ids("▁")
    for t, ids in zip(texts, got, strict=True):
        hf = tok(t)["input_ids"]
        assert ids == (hf[:1] + [space] + hf[1:] if t.startswith(" ") else hf), t[:40]
    assert sum(t.startswith(" ") for t in texts) >= 1


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama-sentencepiece"])
def test_llama_cpp_computes_the_models_logits(arch, text, tmp_path, llama_cpp):
    tok = sentencepiece_bpe(text) if arch.startswith("llama") else byte_bpe("qwen2", text)
    model = {"qwen2": lambda: tiny(Qwen2ForCausalLM, Qwen2Config, len(tok), tie_word_embeddings=True),
             "qwen3": lambda: tiny(Qwen3ForCausalLM, Qwen3Config, len(tok), head_dim=48),   # head_dim ≠ 128/4
             "llama-sentencepiece": lambda: tiny(LlamaForCausalLM, LlamaConfig, len(tok))}[arch]()
    summary = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert summary["architecture"] == arch.split("-")[0]
    ids = tok(text[9000:11000])["input_ids"][:200]
    got = probe(llama_cpp, tmp_path / "m.gguf", {"ids": ids, "prompt": ids[:20], "new": 6})
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        hf = model.generate(torch.tensor([ids[:20]]), max_new_tokens=6, do_sample=False)[0, 20:].tolist()
    nll = [-lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    # f32 weights: only the summation order differs
    assert max(abs(a - b) for a, b in zip(got["nll"], nll, strict=True)) < 3e-3
    assert got["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-3)
    assert got["greedy"] == hf


@pytest.mark.parametrize("pre, why", [
    (pre_tokenizers.Whitespace(), r"pre-tokenizer Whitespace"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(r"\d", behavior="isolated"),
                              pre_tokenizers.ByteLevel(use_regex=False)]), r"pre-tokenizer Split\+ByteLevel"),
])
def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused_with_nothing_written(pre, why, tmp_path):
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre
    model = tiny(LlamaForCausalLM, LlamaConfig, 3)
    with pytest.raises(CalqError, match=f"llama.cpp has no tokenizer that splits text as this one does .*{why}"):
        write_gguf(model, PreTrainedTokenizerFast(tokenizer_object=tok), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_transformers_reads_the_qwen_gguf_back(arch, text, tmp_path):
    """calq evaluate FILE.gguf: transformers' GGUF config mapping drops Qwen3's head size (key_length); calq
    passes it on, so a head_dim other than hidden/heads loads with the right shapes."""
    from calq.calibration.gguf import load_gguf

    tok = byte_bpe("qwen2", text)
    model = tiny(Qwen2ForCausalLM, Qwen2Config, len(tok)) if arch == "qwen2" else \
        tiny(Qwen3ForCausalLM, Qwen3Config, len(tok), head_dim=48)
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back, back_tok = load_gguf(tmp_path / "m.gguf", torch.float32)
    ids = tok(text[9000:10000])["input_ids"][:128]
    assert back_tok(text[9000:10000])["input_ids"][:128] == ids
    with torch.no_grad():
        a, b = model(torch.tensor([ids])).logits, back(torch.tensor([ids])).logits
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
