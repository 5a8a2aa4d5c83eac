"""Stages that need no data (RTN, magnitude pruning) run without a single calibration forward."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import calq
import calq.api
from calq.api import compress_model, load_model
from calq.methods.quantizer import QuantArgs, quantize_rtn
from calq.recipe.schema import validate_recipe


@pytest.fixture
def no_forward(monkeypatch):
    """Fail if anything captures block inputs (the first step of every calibration forward)."""
    def boom(*a, **k):
        raise AssertionError("a calibration forward ran")
    monkeypatch.setattr(calq.api, "capture_block_inputs", boom)


def test_rtn_recipe_runs_no_forward_and_equals_rtn_of_the_weights(tmp_path, no_forward):
    recipe = validate_recipe({"model": "zoo:llama", "stages": [{"method": "rtn", "bits": 4, "group_size": 128}]})
    report = calq.compress(recipe, tmp_path / "out", evaluate=False, device="cpu")
    assert report.data_free and all(m.rel_error is None and m.tokens == 0 for m in report.modules)
    assert "per-layer errors not measured" in (tmp_path / "out" / "report.md").read_text()
    dense, _, _ = load_model("zoo:llama", dtype=None)
    back = calq.load(tmp_path / "out")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        W = dense.get_submodule(name).weight.float()
        W_hat = quantize_rtn(W, QuantArgs(bits=4, group_size=128, scale_dtype=torch.float16))[3]
        assert torch.equal(back.get_submodule(name).weight, W_hat)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as st:
        assert "model.layers.0.self_attn.q_proj.weight_packed" in set(st.keys())


def test_magnitude_pruning_is_data_free_and_wanda_is_not(no_forward):
    model, tok, dtype = load_model("zoo:llama")
    res = compress_model(model, tok, validate_recipe({"stages": [{"method": "prune", "sparsity": "2:4"}]}),
                         torch.device("cpu"), dtype)
    assert res.replaced and all(m.rel_error is None for m in res.replaced)
    with pytest.raises(AssertionError, match="calibration forward"):
        compress_model(model, tok, validate_recipe({"stages": [{"method": "prune", "criterion": "wanda"}]}),
                       torch.device("cpu"), dtype)


def test_mixed_recipe_calibrates_only_for_the_stage_that_needs_it():
    model, tok, dtype = load_model("zoo:llama")
    recipe = validate_recipe({"calibration": {"num_samples": 8, "seq_len": 128},
                              "stages": [{"method": "rtn", "bits": 3, "group_size": 128},
                                         {"method": "eora", "rank": 8}]})
    res = compress_model(model, tok, recipe, torch.device("cpu"), dtype)
    assert all(m.rel_error is None for m in res.modules)                   # rtn: no forward of its own
    assert res.adapters and all(a.rel_error_after < a.rel_error_before for a in res.adapters)
