"""YAML file -> Recipe, with command-line overrides applied through the same validation."""

from __future__ import annotations

from pathlib import Path

import yaml

from calq.errors import RecipeError
from calq.files import read_text
from calq.recipe.schema import Recipe, validate_recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def find_recipe(ref: str | Path) -> Path:
    """A recipe path, or the name of a bundled recipe (`gptq-w4g128` -> recipes/gptq-w4g128.yaml)."""
    p = Path(ref)
    if p.is_file():
        return p
    bundled = RECIPES_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if not p.parent.parts and bundled.is_file():
        return bundled
    raise RecipeError(f"recipe not found: {ref}", "give a path to a .yaml file, or a name from `calq recipes list`")


def read_yaml(path: Path) -> dict:
    text = read_text(path, RecipeError, "save the recipe as UTF-8 YAML text")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}",
                          "fix the YAML syntax") from None
    except RecursionError:
        raise RecipeError(f"{path}: YAML nested too deeply to read", "a recipe is a few levels of mappings") from None
    return data if data is not None else {}


def load_recipe(ref: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe; `overrides` is a nested dict merged over the YAML before validation."""
    path = find_recipe(ref)
    data = read_yaml(path)
    if overrides and isinstance(data, dict):
        data = merge_overrides(data, overrides)
    return validate_recipe(data, source=str(path))


def merge_overrides(base: dict, over: dict) -> dict:
    """`over` merged into `base` recursively; None values leave the base value alone."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            continue
        if isinstance(v, dict):
            if k in out and not isinstance(out[k], dict):
                continue                # the recipe's own value is no mapping: validation reports that
            merged = merge_overrides(out.get(k, {}), v)
            if merged or k in out:      # overrides that are all None add no section
                out[k] = merged
        else:
            out[k] = v
    return out


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in), as written next to the checkpoint."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
