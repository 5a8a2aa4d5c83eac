"""Every stage order either writes the model calq built (the checkpoint read back gives the in-memory model's
logits) or is refused at validation with one line. The refused ones really would write another model."""

import pytest
import torch

import calq.api
from calq import api
from calq.api import compress_model, load_model
from calq.errors import RecipeError
from calq.export.reader import load_checkpoint
from calq.recipe.schema import validate_recipe

RTN = {"method": "rtn", "group_size": 32}


def _recipe(model_dir, stages):
    return validate_recipe({"model": str(model_dir), "calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 4},
                            "stages": stages, "evaluation": {"seq_len": 32, "max_windows": 2}})


def _gap(tmp_path, model_dir, stages) -> float:
    """max |logits read back − logits in memory| / max |logits in memory|."""
    recipe = _recipe(model_dir, stages)
    model, tok, _ = load_model(str(model_dir), dtype=None)
    compress_model(model, tok, recipe, torch.device("cpu"), torch.float16)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mem = model.float()(ids).logits
        api.compress(recipe, tmp_path / "out", evaluate=False, device="cpu")
        back = load_checkpoint(tmp_path / "out")(ids).logits
    return float((back - mem).abs().max() / mem.abs().max())


@pytest.mark.parametrize("stages", [
    [{"method": "prune"}, RTN],
    [RTN, {"method": "eora", "rank": 8}],
    [{"method": "gptq", "group_size": 32}, {"method": "eora", "rank": 8}],
    [{"method": "prune"}, {"method": "eora", "rank": 8}],
    [{"method": "corda", "rank": 8}, RTN],
], ids=lambda s: "-".join(x["method"] for x in s))
def test_supported_orders_write_the_model_in_memory(tmp_path, tiny_llama_dir, stages):
    assert _gap(tmp_path, tiny_llama_dir, stages) < 2e-3       # fp16 storage of weights and adapters


@pytest.mark.parametrize("stages, needle", [
    ([RTN, {"method": "prune"}], "stages[1]: prune after rtn changes a weight the checkpoint stores as rtn's codes"),
    ([RTN, {"method": "corda", "rank": 8}], "stages[1]: corda after rtn changes a weight"),
    ([{"method": "gptq", "group_size": 32}, RTN], "stages[1]: gptq then rtn quantize the same weight twice"),
    ([RTN, {"method": "eora"}, {"method": "eora"}], "stages[2]: eora then eora both add an adapter"),
    ([{"method": "corda"}, RTN, {"method": "eora"}], "stages[2]: corda then eora both add an adapter"),
], ids=["rtn-prune", "rtn-corda", "gptq-rtn", "eora-eora", "corda-eora"])
def test_other_orders_are_refused_before_any_work(tmp_path, tiny_llama_dir, stages, needle):
    with pytest.raises(RecipeError) as e:
        api.compress(_recipe(tiny_llama_dir, stages), tmp_path / "out", evaluate=False, device="cpu")
    assert needle in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tiny_llama_dir]


def test_disjoint_targets_may_quantize_twice(tmp_path, tiny_llama_dir):
    stages = [{**RTN, "targets": ["re:.*self_attn.*"]}, {"method": "gptq", "group_size": 32, "targets": ["re:.*mlp.*"]}]
    assert _gap(tmp_path, tiny_llama_dir, stages) < 2e-3


@pytest.mark.parametrize("stages", [[RTN, {"method": "prune"}], [RTN, {"method": "corda", "rank": 8}]],
                         ids=["rtn-prune", "rtn-corda"])
def test_refused_orders_would_write_another_model(tmp_path, tiny_llama_dir, stages, monkeypatch):
    monkeypatch.setattr(calq.api, "order_problem", lambda methods: None)
    assert _gap(tmp_path, tiny_llama_dir, stages) > 0.3
