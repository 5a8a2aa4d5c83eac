"""Shared fixtures: the bundled demo models, a tiny in-process Llama, and paths to shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"real English text not present at {WIKITEXT_TEST} (only in the project's CI)")
    return WIKITEXT_TEST


@pytest.fixture(scope="session")
def zoo_llama_path() -> Path:
    from calq.zoo import zoo_path

    return zoo_path("llama")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from calq.zoo import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def save_tiny_llama(path: Path, tokenizer) -> Path:
    """A randomly initialised 2-block Llama saved as a local model folder (fp16, the zoo tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).half()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path, tokenizer) -> Path:
    return save_tiny_llama(tmp_path / "tiny-llama", tokenizer)


@pytest.fixture(scope="session")
def shared_tiny_llama(tmp_path_factory, tokenizer) -> Path:
    """The same model built once per session, for tests that only read it."""
    return save_tiny_llama(tmp_path_factory.mktemp("shared") / "tiny-llama", tokenizer)
