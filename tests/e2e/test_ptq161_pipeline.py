"""PTQ1.61 end to end on the bundled Llama: learned scales beat the mask alone, shared masks, exact reload, EoRA."""

from __future__ import annotations

import json

import pytest
import torch

import calq
from calq.api import compress_model, load_model
from calq.calibration.data import evaluation_windows, load_text
from calq.eval.perplexity import perplexity
from calq.export.inspect import inspect_checkpoint
from calq.export.writer import write_checkpoint
from calq.methods.ptq161 import unpack_bits
from calq.recipe.schema import validate_recipe

pytestmark = pytest.mark.slow

CALIB = {"dataset": "stdlib:train", "num_samples": 16, "seq_len": 256, "seed": 0, "batch_size": 4}


def _run(**stage):
    recipe = validate_recipe({"model": "zoo:llama", "calibration": CALIB,
                              "stages": [{"method": "ptq161", "epochs": 2, **stage}]})
    model, tok, dtype = load_model("zoo:llama")
    result = compress_model(model, tok, recipe, torch.device("cpu"), dtype)
    return model, tok, dtype, result


@pytest.fixture(scope="module")
def windows(tokenizer):
    return evaluation_windows(load_text("stdlib:test"), tokenizer, seq_len=512, max_windows=8)


@pytest.fixture(scope="module")
def learned():
    return _run()


def test_learned_scales_beat_the_mask_alone(learned, windows):
    mask_only, *_ = _run(learn=False)
    dense, _, _ = load_model("zoo:llama")
    p_dense, p_mask, p_learned = (perplexity(m, windows) for m in (dense, mask_only, learned[0]))
    assert p_dense < p_learned < p_mask, (p_dense, p_learned, p_mask)


def test_checkpoint_reload_is_exact_and_masks_are_shared(learned, windows, tmp_path):
    model, tok, dtype, result = learned
    ids = windows[:2]
    with torch.no_grad():
        mem = model(ids).logits
    write_checkpoint(model.to(dtype), [m.record for m in result.modules], tmp_path, ["lm_head"])
    tok.save_pretrained(tmp_path)
    with torch.no_grad():
        ours = calq.load(tmp_path)(ids).logits
    assert (ours - mem).abs().max().item() < 1e-4 * mem.abs().max().item()

    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "calq" and len(qcfg["calq_modules"]) == 28
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    layer = "model.layers.1"
    mask = {n: unpack_bits(state[f"{layer}.{n}.mask"], 256) for n in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
             "self_attn.o_proj")}
    # Linears fed the same input share one mask; a different input gives a different one
    assert torch.equal(mask["self_attn.q_proj"], mask["self_attn.k_proj"])
    assert torch.equal(mask["self_attn.q_proj"], mask["self_attn.v_proj"])
    assert torch.equal(mask["mlp.gate_proj"], mask["mlp.up_proj"])
    assert not torch.equal(mask["self_attn.q_proj"], mask["self_attn.o_proj"])
    assert all(int(m.sum()) == 52 for m in mask.values())      # floor(0.2 · 256) + 1

    rows = {r["name"]: r for r in inspect_checkpoint(tmp_path)}
    per_module = {m.record.name: m for m in result.modules}
    assert set(rows) == set(per_module)
    for r in rows.values():
        assert r["method"] == "ptq161" and 1.6 < r["bits_per_weight"] < 2.0   # short rows: scales weigh more


def test_eora_compensates_ptq161(learned, windows, tmp_path):
    # The EoRA issue: `eora` follows any compression stage, PTQ1.61's calq-packed Linears included.
    recipe = validate_recipe({"model": "zoo:llama", "calibration": CALIB,
                              "stages": [{"method": "ptq161", "epochs": 2}, {"method": "eora", "rank": 16}],
                              "evaluation": {"seq_len": 512, "max_windows": 8}})
    report = calq.compress(recipe, tmp_path / "out", device="cpu")
    assert len(report.adapters) == 28
    assert all(a.rel_error_after < a.rel_error_before for a in report.adapters)
    # scored on the checkpoint read back from disk (packed PTQ1.61 weights + PEFT adapter)
    assert report.evaluation[0].ppl < perplexity(learned[0], windows)
