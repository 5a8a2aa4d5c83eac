"""GGUF files as a model source: a tiny Llama written with the gguf package, read back through transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import calq
from calq.calibration.gguf import gguf_info, load_gguf
from calq.cli.main import app
from calq.errors import ModelError
from calq.export.gguf import rotary_permute, write_gguf

runner = CliRunner()


def _tiny_llama(tokenizer, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    """(HF folder, f32 GGUF of the same weights) of a random 2-block Llama with the zoo tokenizer."""
    d = tmp_path_factory.mktemp("gguf")
    model = _tiny_llama(tokenizer, tie=False)
    model.save_pretrained(d / "hf")
    tokenizer.save_pretrained(d / "hf")
    write_gguf(model, tokenizer, d / "tiny.gguf", dtype="f32")
    return d / "hf", d / "tiny.gguf"


def test_rotary_permutation_is_llama_cpp_pairs():
    # head_dim 4: HF holds rows (x0, x1 | y0, y1) per head, llama.cpp interleaves them (x0, y0, x1, y1)
    W = torch.arange(8.0)[:, None].repeat(1, 3)         # 2 heads x head_dim 4
    assert rotary_permute(W, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_round_trip_gives_the_same_model(tmp_path, tokenizer, tie):
    model = _tiny_llama(tokenizer, tie)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    back, tok = load_gguf(tmp_path / "m.gguf", torch.float32)
    assert back.config.tie_word_embeddings == tie
    text = (Path(calq.__file__).parent / "api.py").read_text()[:2000]
    ids = tokenizer(text)["input_ids"]
    assert tok(text)["input_ids"] == ids          # same vocabulary, merges and splitting
    x = torch.tensor([ids[:100]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)          # f32 tensors, q/k permuted and back


def test_f16_gguf_is_half_the_bytes_and_close(tmp_path, tokenizer):
    model = _tiny_llama(tokenizer, tie=False)
    f32 = write_gguf(model, tokenizer, tmp_path / "a.gguf", dtype="f32")
    f16 = write_gguf(model, tokenizer, tmp_path / "b.gguf", dtype="f16")
    assert f16["bytes"] < 0.55 * f32["bytes"]
    back, _ = load_gguf(tmp_path / "b.gguf", torch.float32)
    x = torch.randint(0, len(tokenizer), (1, 64))
    with torch.no_grad():
        a, b = model(x).logits, back(x).logits
    assert 0 < (a - b).abs().max() < 1e-2 * a.abs().max()
    info = gguf_info(tmp_path / "b.gguf")
    assert info["file_type"] == "F16" and set(info["tensor_types"]) == {"F16", "F32"}


def test_evaluate_gguf_equals_the_hf_folder(tiny_gguf):
    hf, gg = tiny_gguf
    a = calq.evaluate(str(hf), ["stdlib:test"], seq_len=128, max_windows=4, device="cpu")[0]
    b = calq.evaluate(str(gg), ["stdlib:test"], seq_len=128, max_windows=4, device="cpu")[0]
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-6)
    assert b["source_format"] == "gguf" and b["gguf_file_type"] == "ALL_F32"
    assert b["sha256"] == hashlib.sha256(gg.read_bytes()).hexdigest()


def test_cli_evaluate_gguf_json(tiny_gguf):
    _, gg = tiny_gguf
    r = runner.invoke(app, ["evaluate", str(gg), "--seq-len", "128", "--max-windows", "2", "--json",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output.strip().splitlines()[-1])
    assert row["windows"] == 2 and np.isfinite(row["ppl"])


def test_compress_from_gguf_records_the_source(tmp_path, tiny_gguf):
    _, gg = tiny_gguf
    recipe = {"model": str(gg), "calibration": {"num_samples": 4, "seq_len": 64},
              "stages": [{"method": "gptq", "bits": 4, "group_size": 32}],
              "evaluation": {"seq_len": 64, "max_windows": 2}}
    from calq.recipe.schema import validate_recipe

    report = calq.compress(validate_recipe(recipe), tmp_path / "out", device="cpu")
    assert report.source["format"] == "gguf" and report.source["file_type"] == "ALL_F32"
    assert report.source["sha256"] == hashlib.sha256(gg.read_bytes()).hexdigest()
    assert "GGUF `tiny.gguf`" in (tmp_path / "out" / "report.md").read_text()
    assert calq.load(tmp_path / "out").config.model_type == "llama"


@pytest.mark.parametrize("content, message", [
    (b"", "not a GGUF file"),
    (b"PK\x03\x04 a zip", "not a GGUF file"),
    (b"GGUF" + b"\x00" * 12, "not a readable GGUF file"),
])
def test_bad_gguf_files_are_one_line_errors(tmp_path, content, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    r = runner.invoke(app, ["evaluate", str(bad)])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_truncated_and_missing_gguf(tmp_path, tiny_gguf):
    _, gg = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gg.read_bytes()[: gg.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_gguf(cut, None)
    with pytest.raises(ModelError, match="not found"):
        load_gguf(tmp_path / "missing.gguf", None)


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "foo.gguf"
    w = gguf.GGUFWriter(str(path), "foo")
    w.add_tensor("blk.0.x.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = runner.invoke(app, ["evaluate", str(path)])
    assert r.exit_code == 2 and "architecture 'foo'" in r.output and "Traceback" not in r.output


def test_disk_offload_of_gguf_is_refused(tiny_gguf):
    _, gg = tiny_gguf
    r = runner.invoke(app, ["evaluate", str(gg), "--offload", "disk"])
    assert r.exit_code == 2 and "GGUF file" in r.output
