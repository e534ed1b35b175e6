"""Recipe validation: shipped recipes, problems with their place in the file, overrides, ``slimmer validate``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from helpers import REPOSITORY, run_cli_process, write_yaml
from slimmer.errors import RecipeError
from slimmer.model_io import import_callable
from slimmer.recipe import DecomposeStep, FinetuneStep, Recipe, apply_overrides, load_recipe, recipe_from_dict

SHIPPED_RECIPES = sorted((REPOSITORY / "recipes").glob("*.yaml"))


def problems_of(raw: object) -> list[str]:
    with pytest.raises(RecipeError) as raised:
        recipe_from_dict(raw)
    return raised.value.problems


def test_recipes_folder_not_empty() -> None:
    assert SHIPPED_RECIPES, "recipes/*.yaml matched no file"


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=[path.stem for path in SHIPPED_RECIPES])
def test_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)

    assert isinstance(recipe, Recipe)
    assert recipe.steps
    assert recipe.base_dir == str(path.parent.resolve())


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=[path.stem for path in SHIPPED_RECIPES])
def test_shipped_recipe_architecture_imports(path: Path) -> None:
    recipe = load_recipe(path)
    folders = [recipe.resolve_path(folder) for folder in recipe.model.python_path]

    assert recipe.model.architecture is not None
    assert callable(import_callable(recipe.model.architecture, folders))


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=[path.stem for path in SHIPPED_RECIPES])
def test_shipped_recipe_data_folders_exist(path: Path) -> None:
    recipe = load_recipe(path)
    datasets = [dataset for dataset in (recipe.data.train, recipe.data.val) if dataset is not None]
    for dataset in datasets:
        if dataset.image_folder is not None:
            assert recipe.resolve_path(dataset.image_folder).is_dir(), dataset.image_folder


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param({"stesp": []}, "stesp: unknown key (did you mean 'steps'?)", id="top_level"),
    pytest.param({"model": {"architecure": "a:b"}}, "model.architecure: unknown key (did you mean 'architecture'?)",
                 id="model"),
    pytest.param({"steps": [{"decompose": {"rnak": {"ratio": 0.5}}}]},
                 "steps[0].decompose.rnak: unknown key (did you mean 'rank'?)", id="step_field"),
    pytest.param({"steps": [{"prnue": {}}]}, "steps[0]: unknown step 'prnue' (did you mean 'prune'?)", id="step_kind"),
    pytest.param({"report": {"latency": {"run": 60}}}, "report.latency.run: unknown key (did you mean 'runs'?)",
                 id="nested"),
])
def test_unknown_key_suggests(raw: dict, expected: str) -> None:
    assert problems_of(raw) == [expected]


def test_unknown_key_lists_known() -> None:
    problems = problems_of({"export": {"zzz": 1}})

    assert problems == ["export.zzz: unknown key (expected one of: opset, parity)"]


@pytest.mark.parametrize(("raw", "place", "detail"), [
    pytest.param({"steps": [{"decompose": {"rank": {"ratio": 1.5}}}]}, "steps[0].decompose.rank.ratio",
                 "less than or equal to 1, found 1.5", id="ratio_above_one"),
    pytest.param({"steps": [{"decompose": {"rank": {"ratio": "half"}}}]}, "steps[0].decompose.rank.ratio",
                 "valid number", id="ratio_not_number"),
    pytest.param({"data": {"batch_size": "many"}}, "data.batch_size", "valid integer", id="batch_size_text"),
    pytest.param({"report": {"latency": {"runs": 5}}}, "report.latency.runs",
                 "greater than or equal to 50, found 5", id="too_few_runs"),
    pytest.param({"steps": [{"prune": {"ratio": 1.0}}]}, "steps[0].prune.ratio", "less than 1", id="prune_all"),
    pytest.param({"steps": [{"prune": {"targets": "everything"}}]}, "steps[0].prune.targets",
                 "'bottleneck' or 'all_1x1'", id="prune_targets"),
    pytest.param({"export": {"parity": {"atol": -1}}}, "export.parity.atol", "greater than or equal to 0",
                 id="negative_atol"),
    pytest.param({"steps": [{"finetune": {"lr": 0.1}}]}, "steps[0].finetune", "give epochs or steps",
                 id="finetune_no_budget"),
    pytest.param({"steps": [{"decompose": {"rank": {"ratio": 0.5, "fixed": 3}}}]}, "steps[0].decompose.rank",
                 "give exactly one of fixed, ratio or energy", id="two_rank_rules"),
    pytest.param({"steps": "decompose"}, "steps", "expected a list of steps", id="steps_not_list"),
])
def test_invalid_value_reports_place(raw: dict, place: str, detail: str) -> None:
    problems = problems_of(raw)

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{place}: ")
    assert detail in problems[0]


def test_all_problems_at_once() -> None:
    raw = {"modle": {}, "data": {"batch_size": 0},
           "steps": [{"decompose": {"rank": {"ratio": 1.5}}}, {"prnue": {}}, {"finetune": {"lr": 0.1}}]}
    with pytest.raises(RecipeError) as raised:
        recipe_from_dict(raw, source="recipe r.yaml")
    places = [problem.split(":")[0] for problem in raised.value.problems]

    assert sorted(places) == sorted(["modle", "data.batch_size", "steps[0].decompose.rank.ratio", "steps[1]",
                                     "steps[2].finetune"])
    assert str(raised.value).startswith("invalid recipe r.yaml (5 problems): ")


def test_top_level_not_mapping() -> None:
    assert problems_of([1, 2]) == ["expected a mapping at the top level, found list"]


def test_empty_recipe_defaults() -> None:
    recipe = recipe_from_dict(None)

    assert recipe.steps == []
    assert recipe.report.latency.runs == 50


# Overrides.

def base_raw() -> dict:
    return {"name": "r", "steps": [{"decompose": {"rank": {"ratio": 0.5}}}, {"finetune": {"epochs": 1}}]}


def test_override_sets_nested_list_item() -> None:
    raw = apply_overrides(base_raw(), ["steps[0].decompose.rank.ratio=0.25", "steps[1].finetune.steps=2"])

    assert raw["steps"][0]["decompose"]["rank"] == {"ratio": 0.25}
    assert raw["steps"][1]["finetune"] == {"epochs": 1, "steps": 2}


def test_override_parses_yaml_values() -> None:
    raw = apply_overrides(base_raw(), ["seed=3", "report.latency.batch_sizes=[1, 8]", "report.latency.enabled=false",
                                       "model.architecture=null", "name=resnet:v2"])

    assert raw["seed"] == 3
    assert raw["report"]["latency"] == {"batch_sizes": [1, 8], "enabled": False}
    assert raw["model"]["architecture"] is None
    assert raw["name"] == "resnet:v2"


def test_override_empty_value_is_null() -> None:
    assert apply_overrides(base_raw(), ["name="])["name"] is None


@pytest.mark.parametrize(("override", "fragment"), [
    pytest.param("seed", "is not key=value", id="no_equals"),
    pytest.param("=3", "is not key=value", id="no_key"),
    pytest.param("steps[5].decompose.round_to=4", "no list item [5]", id="index_out_of_range"),
    pytest.param("steps[x].decompose=1", "index 'x' is not a number", id="index_not_number"),
    pytest.param("name.first=a", "'first' is not inside a mapping", id="through_scalar"),
])
def test_override_rejects(override: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as raised:
        apply_overrides(base_raw(), [override])

    assert fragment in str(raised.value)


def test_finetune_epochs_and_steps_warns(caplog: pytest.LogCaptureFixture) -> None:
    raw = apply_overrides(base_raw(), ["steps[1].finetune.steps=2"])

    with caplog.at_level(logging.WARNING, logger="slimmer.recipe"):
        recipe = recipe_from_dict(raw)

    assert recipe.steps[1].finetune.steps == 2
    assert [record.getMessage() for record in caplog.records] == [
        "steps[1].finetune gives both epochs (1) and steps (2): it trains for 2 steps and ignores epochs; "
        "remove one of them"]


def test_finetune_epochs_alone_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="slimmer.recipe"):
        recipe_from_dict(base_raw())

    assert caplog.records == []


def test_resolved_recipe_paths_absolute(tmp_path: Path) -> None:
    raw = {"model": {"python_path": ["..", "/opt/models"]},
           "data": {"train": {"image_folder": "images/train"}, "val": {"callable": "examples.digits:digits_dataset"}}}
    recipe = recipe_from_dict(raw, base_dir=tmp_path / "recipes")

    resolved = yaml.safe_load(recipe.to_yaml())

    assert resolved["model"]["python_path"] == [str(tmp_path.resolve()), "/opt/models"]
    assert resolved["data"]["train"]["image_folder"] == str((tmp_path / "recipes" / "images" / "train").resolve())
    assert resolved["data"]["val"]["image_folder"] is None
    assert recipe.model.python_path == ["..", "/opt/models"]


def test_load_recipe_validates_overrides(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "r.yaml", base_raw())
    with pytest.raises(RecipeError) as raised:
        load_recipe(path, ["steps[0].decompose.rank.ratio=2"])

    assert raised.value.problems[0].startswith("steps[0].decompose.rank.ratio: ")


def test_load_recipe_applies_overrides(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "r.yaml", base_raw())
    recipe = load_recipe(path, ["steps[0].decompose.rank.ratio=0.25", "seed=7"])

    assert isinstance(recipe.steps[0], DecomposeStep)
    assert recipe.steps[0].decompose.rank.ratio == 0.25
    assert isinstance(recipe.steps[1], FinetuneStep)
    assert recipe.seed == 7


def test_relative_paths_from_recipe_folder(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "r.yaml", base_raw())

    assert load_recipe(path).resolve_path("data/train") == tmp_path.resolve() / "data" / "train"


def test_load_recipe_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("steps: [decompose\n", encoding="utf-8")

    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(path)


def test_resolved_yaml_round_trip(tmp_path: Path) -> None:
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", base_raw()))
    again = load_recipe(write_yaml(tmp_path / "again.yaml", yaml.safe_load(recipe.to_yaml())))

    assert again.model_dump() == recipe.model_dump()


# slimmer validate.

def test_validate_cli_valid(tmp_path: Path, run_cli) -> None:
    path = write_yaml(tmp_path / "r.yaml", base_raw())
    result = run_cli("validate", path)

    assert result.exit_code == 0
    assert result.stdout.strip() == f"{path}: valid (2 steps: decompose, finetune)"
    assert result.stderr == ""


def test_validate_cli_invalid(tmp_path: Path, run_cli) -> None:
    path = write_yaml(tmp_path / "r.yaml", {"stesp": []})
    result = run_cli("validate", path)

    assert result.exit_code == 2
    assert result.stderr_lines == [f"slimmer: error: invalid recipe {path}: stesp: unknown key (did you mean 'steps'?) (line 1)"]


def test_validate_cli_bad_override(tmp_path: Path, run_cli) -> None:
    path = write_yaml(tmp_path / "r.yaml", base_raw())
    result = run_cli("validate", path, "steps[0].decompose.rank.ratio=-1")

    assert result.exit_code == 2
    assert "steps[0].decompose.rank.ratio: Input should be greater than 0" in result.stderr


def test_validate_cli_missing_file(tmp_path: Path, run_cli) -> None:
    result = run_cli("validate", tmp_path / "absent.yaml")

    assert result.exit_code == 2
    assert "file not found" in result.stderr


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=[path.stem for path in SHIPPED_RECIPES])
def test_validate_cli_shipped(path: Path, run_cli) -> None:
    assert run_cli("validate", path).exit_code == 0


def test_validate_process_exit_codes(tmp_path: Path) -> None:
    valid = write_yaml(tmp_path / "valid.yaml", base_raw())
    invalid = write_yaml(tmp_path / "invalid.yaml", {"steps": [{"decompose": {"rank": {"ratio": 1.5}}}]})

    valid_run = run_cli_process("validate", valid, cwd=tmp_path)
    invalid_run = run_cli_process("validate", invalid, cwd=tmp_path)

    assert valid_run.returncode == 0, valid_run.stderr
    assert invalid_run.returncode == 2
    assert "steps[0].decompose.rank.ratio" in invalid_run.stderr


def test_rank_with_both_modes_rejected() -> None:
    raw = {"steps": [{"decompose": {"rank": {"ratio": 0.5}, "rank_in": {"fixed": 8}, "rank_out": {"fixed": 8}}}]}
    with pytest.raises(RecipeError, match=r"steps\[0\]\.decompose: rank would be ignored"):
        recipe_from_dict(raw)


def test_recipe_errors_name_lines(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("version: 1\nmodel:\n  architecure: x\nsteps:\n  - decompose:\n      rank: {ratio: 1.5}\n"
                    "  - prun: {}\n", encoding="utf-8")
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    problems = raised.value.problems
    assert problems[0].endswith("(line 3)")
    assert problems[0].startswith("model.architecure: unknown key")
    assert problems[1].startswith("steps[0].decompose.rank.ratio:")
    assert problems[1].endswith("(line 6)")
    assert problems[2].endswith("(line 7)")
