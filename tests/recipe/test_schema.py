import pytest

from calq.errors import RecipeError
from calq.recipe.load import RECIPES_DIR, load_recipe
from calq.recipe.schema import validate_recipe

BASE = {"model": "zoo:llama", "stages": [{"method": "gptq", "bits": 4, "group_size": 128}]}


def _with(**stage):
    return {**BASE, "stages": [{**BASE["stages"][0], **stage}]}


@pytest.mark.parametrize("data,message", [
    (_with(bits=9), "stages[0].bits: Input should be less than or equal to 8"),
    (_with(bits=1), "stages[0].bits: Input should be greater than or equal to 2"),
    (_with(group_size=0), "stages[0].group_size: must be -1"),
    (_with(method="awq"), "stages[0].method: unknown method 'awq'"),
    (_with(blocksize=64), "stages[0].blocksize: unknown key"),
    (_with(actorder="group"), "stages[0].actorder: 'group' is not supported"),
    (_with(targets=["re:("]), "stages[0].targets: bad regex"),
    ({**BASE, "calibraton": {}}, "calibraton: unknown key"),
    ({**BASE, "calibration": {"num_samples": 0}}, "calibration.num_samples"),
    ({**BASE, "calibration": {"dataset": "nope/missing.txt"}}, "calibration.dataset: dataset file not found"),
    ({**BASE, "evaluation": {"datasets": ["stdlib:dev"]}}, "evaluation.datasets: unknown stdlib split"),
    ({"model": "zoo:llama", "stages": []}, "stages: List should have at least 1 item"),
    ({"model": "zoo:llama", "stages": [{"bits": 4}]}, "stages[0].method: each stage needs a `method:`"),
    ([1, 2], "a recipe must be a YAML mapping"),
    ({"model": "zoo:llama", "stages": [{"method": "eora"}]}, "stages[0].method: eora compensates an earlier"),
    ({"model": "zoo:llama", "stages": [{"method": "rtn"}, {"method": "eora", "basis": "pca"}]},
     "stages[1].basis: Input should be 'eora', 'svd', 'act-s' or 'corda'"),
])
def test_errors_name_the_field(data, message):
    with pytest.raises(RecipeError) as e:
        validate_recipe(data)
    assert message in str(e.value)


def test_defaults_and_aliases():
    r = validate_recipe(_with(actorder="weight"))
    s = r.stages[0]
    assert (s.actorder, s.dampening_frac, s.block_size, s.symmetric, s.layout) == (True, 0.01, 128, True, "oc")
    assert s.ignore == ["lm_head"] and s.targets == ["Linear"]
    assert validate_recipe(_with(actorder=None)).stages[0].actorder is False
    dumped = r.model_dump(mode="json")
    assert dumped["stages"][0]["dampening_frac"] == 0.01     # method keys survive a dump (resolved recipe)
    assert validate_recipe(dumped) == r


def test_malformed_yaml_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: zoo:llama\nstages:\n  - method: gptq\n   bits: 4\n")
    with pytest.raises(RecipeError, match=r"malformed YAML at line 4"):
        load_recipe(f)


def test_overrides_go_through_validation(tmp_path):
    r = load_recipe("quickstart", {"calibration": {"num_samples": 7, "seed": None}})
    assert r.calibration.num_samples == 7 and r.calibration.seed == 0
    with pytest.raises(RecipeError, match="calibration.num_samples"):
        load_recipe("quickstart", {"calibration": {"num_samples": -1}})


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_recipes_validate_and_have_expectations(path):
    r = load_recipe(path)
    assert r.expect is not None and r.expect.max_ppl_ratio
    if any(s.method in ("rtn", "gptq") for s in r.stages):
        assert r.expect.max_bits_per_weight
