"""The bundled demo models load offline, beat a unigram model, and the training scan matches transformers'."""

from __future__ import annotations

import pytest
import torch

from calq.calibration.corpus import stdlib_documents
from calq.calibration.data import evaluation_windows, load_text
from calq.eval.perplexity import perplexity, unigram_perplexity
from calq.zoo import zoo_info, zoo_path
from calq.zoo.specs import ZOO

UNIGRAM_FACTOR = 3.0   # issue #2: each demo model must beat the unigram baseline by 3x in perplexity


@pytest.fixture(scope="module")
def unigram_setup(tokenizer):
    train = [t for d in stdlib_documents("train")[:400] for t in tokenizer(d.text, verbose=False)["input_ids"]]
    windows = evaluation_windows(load_text("stdlib:test"), tokenizer, seq_len=512, max_windows=8)
    return train, windows


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_loads_offline_and_beats_unigram(name, unigram_setup, tokenizer, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # read at import: set it too
    path = zoo_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == ZOO[name].arch
    assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
    train, windows = unigram_setup
    ppl = perplexity(model, windows, batch_size=4)
    unigram = unigram_perplexity(train, windows, len(tokenizer))
    assert ppl * UNIGRAM_FACTOR < unigram, f"{name}: ppl {ppl:.2f} vs unigram {unigram:.2f}"
    info = zoo_info(name)
    assert info["ppl_stdlib_test"] * UNIGRAM_FACTOR < info["unigram_ppl_stdlib_test"]


def test_zoo_sizes_under_budget():
    total = sum(f.stat().st_size for n in ZOO for f in zoo_path(n).glob("*.safetensors"))
    assert total < 40e6


def test_llama_shape_requirements():
    cfg = ZOO["llama"].config
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and not cfg["tie_word_embeddings"]
    assert cfg["num_hidden_layers"] >= 4
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    for dim in (cfg["hidden_size"], cfg["intermediate_size"], kv_out):
        assert dim % 128 == 0
