"""Recipe files with command-line overrides: what validates also compresses."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from calq.cli.main import app
from calq.errors import RecipeError
from calq.recipe.load import load_recipe, merge_overrides

CLI_OVERRIDES = {"model": None, "calibration": {"seed": None, "num_samples": None, "seq_len": None}}


def test_a_recipe_without_calibration_section_takes_the_cli_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - method: rtn\n")
    assert load_recipe(path, CLI_OVERRIDES).calibration.num_samples == 128       # defaults, not None
    assert load_recipe(path, {"calibration": {"num_samples": 7}}).calibration.num_samples == 7


def test_overrides_keep_what_they_do_not_set():
    base = {"calibration": {"seed": 1, "dataset": "stdlib:test"}, "stages": []}
    assert merge_overrides(base, {"calibration": {"seed": None, "num_samples": 5}}) == \
        {"calibration": {"seed": 1, "dataset": "stdlib:test", "num_samples": 5}, "stages": []}
    assert merge_overrides({"calibration": "oops"}, {"calibration": {"seed": 2}}) == {"calibration": "oops"}


def test_a_misspelt_section_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("calibraton:\n  seed: 1\nstages:\n  - method: rtn\n")
    with pytest.raises(RecipeError, match="calibraton: unknown key"):
        load_recipe(path, CLI_OVERRIDES)
    r = CliRunner().invoke(app, ["compress", str(path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "calibraton: unknown key" in r.output and not (tmp_path / "out").exists()
