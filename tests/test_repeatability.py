"""Repeatability and robustness of the recipe loader: same seed, same bytes; any YAML, only RecipeError."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import REPOSITORY, digits_recipe, write_yaml
from slimmer.errors import RecipeError
from slimmer.recipe import load_recipe, recipe_from_dict


def test_same_seed_identical_outputs(tmp_path: Path, digits_checkpoint: Path, run_cli) -> None:
    """Two runs with one seed write byte-identical ONNX files and equal compressed weights."""
    recipe = write_yaml(tmp_path / "recipe.yaml", digits_recipe())
    for name in ("first", "second"):
        result = run_cli("apply", recipe, digits_checkpoint, "-o", tmp_path / name, "--quiet")
        assert result.exit_code == 0, result.stderr

    assert (tmp_path / "first" / "model.onnx").read_bytes() == (tmp_path / "second" / "model.onnx").read_bytes()
    first = torch.load(tmp_path / "first" / "model.pt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "second" / "model.pt", weights_only=True)["state_dict"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True), st.text(max_size=12))
KEYS = st.one_of(st.sampled_from(["model", "data", "steps", "decompose", "prune", "finetune", "refit", "rank",
                                  "ratio", "fixed", "form", "seed", "version", "export", "report", "train",
                                  "image_folder", "multiplier", "include", "epochs"]), st.text(max_size=8))
DOCUMENTS = st.recursive(SCALARS, lambda children: st.one_of(st.lists(children, max_size=4),
                                                             st.dictionaries(KEYS, children, max_size=5)),
                         max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_random_documents_raise_recipe_error(document) -> None:
    """Any document either validates or raises RecipeError, never another exception."""
    try:
        recipe_from_dict(document)
    except RecipeError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_random_yaml_text_raises_recipe_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError:
        pass


def test_shipped_recipes_round_trip() -> None:
    """A resolved recipe, written back as YAML and read from another folder, validates to the same recipe."""
    for path in sorted((REPOSITORY / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()), base_dir=REPOSITORY / "docs")
        assert again.dump_with_absolute_paths() == recipe.dump_with_absolute_paths(), path.name


def test_report_records_run_facts(trained_digits) -> None:
    import slimmer

    recipe = digits_recipe(data={}, seed=7, steps=[{"decompose": {"rank": {"ratio": 0.5}}}])
    _, report = slimmer.apply(trained_digits, recipe, progress=False)

    assert report["seed"] == 7
    assert report["recipe_resolved"]["seed"] == 7
    assert report["recipe_resolved"]["steps"][0]["decompose"]["rank"]["ratio"] == 0.5
    assert report["environment"]["torch"] == torch.__version__.split("+")[0]
    assert report["environment"]["cpu_count"] >= 1
