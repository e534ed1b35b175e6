"""Bad inputs through ``slimmer apply``: each gives exit code 2, one line on stderr and no output.

Most cases call ``slimmer.cli.main`` in this process, because starting Python with torch takes
seconds. The cases marked ``process`` run the command as a separate process.
"""

from __future__ import annotations

import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image
from torch import nn

import slimmer
from examples.digits import DigitsCNN
from helpers import CliResult, digits_recipe, run_cli_process, write_yaml
from slimmer.checkpoint import work_dir

IMAGE_TRANSFORM = ["grayscale", "to_tensor"]


class Workspace:
    """A folder with the trained digits checkpoint, a recipe to edit and an output path that must stay absent."""

    def __init__(self, folder: Path, digits_checkpoint: Path) -> None:
        self.folder = folder
        self.model = folder / "model.pt"
        shutil.copyfile(digits_checkpoint, self.model)
        self.output = folder / "out"
        self.recipe_path = folder / "recipe.yaml"

    def recipe(self, **sections: Any) -> Path:
        """Write the digits test recipe with ``sections`` replaced; return its path."""
        return write_yaml(self.recipe_path, digits_recipe(**sections))

    def arguments(self, recipe: Path | None = None, model: Path | None = None, *extra: str) -> list[str]:
        recipe = recipe if recipe is not None else self.recipe()
        model = model if model is not None else self.model
        return ["apply", str(recipe), str(model), "-o", str(self.output), *extra]

    def image_folder(self, name: str, classes: int = 2, mode: str = "L") -> Path:
        """Write an ImageFolder of 8x8 images, two a class; return its path."""
        root = self.folder / name
        for index in range(classes):
            (root / f"class{index:02d}").mkdir(parents=True)
            for number in range(2):
                Image.new(mode, (8, 8), color=40 * number).save(root / f"class{index:02d}" / f"{number}.png")
        return root

    def image_data(self, val: Path, transform: list[Any] | None = None) -> dict[str, Any]:
        """The recipe's data section with ``val`` as an image folder and the digits training split."""
        data = digits_recipe()["data"]
        data["val"] = {"image_folder": str(val), "transform": IMAGE_TRANSFORM if transform is None else transform}
        return data


@dataclass
class BadInput:
    """A bad input: ``make`` builds it in a workspace and returns the command's arguments."""

    make: Callable[[Workspace], list[str]]
    fragment: str  # text the single stderr line must contain
    process: bool = False  # run as a separate process


def small_sequential() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())


# Model files.

def missing_model(space: Workspace) -> list[str]:
    return space.arguments(model=space.folder / "absent.pt")


def empty_model(space: Workspace) -> list[str]:
    space.model.write_bytes(b"")
    return space.arguments()


def truncated_model(space: Workspace) -> list[str]:
    data = space.model.read_bytes()
    space.model.write_bytes(data[: len(data) // 2])
    return space.arguments()


def text_model(space: Workspace) -> list[str]:
    space.model.write_text("weights: none\n")
    return space.arguments()


def onnx_as_pt(space: Workspace) -> list[str]:
    slimmer.export_onnx(small_sequential().eval(), torch.randn(1, 1, 8, 8), space.model)
    return space.arguments()


def zip_not_checkpoint(space: Workspace) -> list[str]:
    with zipfile.ZipFile(space.model, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return space.arguments()


def torchscript_model(space: Workspace) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, yet such files exist
        torch.jit.script(small_sequential()).save(str(space.model))
    return space.arguments()


def pickled_module(space: Workspace) -> list[str]:
    torch.save(small_sequential(), space.model)
    return space.arguments()


def state_dict_not_fitting(space: Workspace) -> list[str]:
    torch.save({"state_dict": DigitsCNN(width=16).state_dict()}, space.model)
    return space.arguments()


def wrong_state_dict_key(space: Workspace) -> list[str]:
    return space.arguments(None, None, "model.state_dict_key=weights")


def model_is_folder(space: Workspace) -> list[str]:
    return space.arguments(model=space.image_folder("images"))


def corrupt_safetensors(space: Workspace) -> list[str]:
    path = space.folder / "model.safetensors"
    path.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"weight\": broken")
    return space.arguments(None, path, "model.state_dict_key=auto")


def safetensors_with_key(space: Workspace) -> list[str]:
    from safetensors.torch import save_file

    path = space.folder / "model.safetensors"
    state_dict = torch.load(space.model, weights_only=True)["state_dict"]
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    return space.arguments(model=path)


# Recipes.

def missing_recipe(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.folder / "absent.yaml")


def recipe_is_folder(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.image_folder("images"))


def bad_yaml(space: Workspace) -> list[str]:
    space.recipe_path.write_text("steps: [decompose\n", encoding="utf-8")
    return space.arguments(recipe=space.recipe_path)


def recipe_top_level_list(space: Workspace) -> list[str]:
    space.recipe_path.write_text("- decompose\n- prune\n", encoding="utf-8")
    return space.arguments(recipe=space.recipe_path)


def unknown_key(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.recipe(stesp=[]))


def wrong_type(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.recipe(seed="first"))


def ratio_above_one(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.recipe(steps=[{"decompose": {"rank": {"ratio": 1.5}}}]))


def negative_epochs(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.recipe(steps=[{"finetune": {"epochs": -1}}]))


def finetune_without_train_data(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.recipe(data={"val": digits_recipe()["data"]["val"]}))


def rank_with_separable(space: Workspace) -> list[str]:
    step = {"decompose": {"form": "separable", "multiplier": {"fixed": 2}, "rank": {"ratio": 0.5}}}
    return space.arguments(recipe=space.recipe(steps=[step]))


def unknown_architecture_module(space: Workspace) -> list[str]:
    model = {**digits_recipe()["model"], "architecture": "examples.no_such_module:digits_cnn"}
    return space.arguments(recipe=space.recipe(model=model))


def architecture_without_callable(space: Workspace) -> list[str]:
    model = {**digits_recipe()["model"], "architecture": "examples.digits"}
    return space.arguments(recipe=space.recipe(model=model))


def unknown_step(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.recipe(steps=[{"quantize": {"bits": 8}}]))


def input_shape_not_fitting(space: Workspace) -> list[str]:
    model = {**digits_recipe()["model"], "input_shape": [3, 8, 8]}
    return space.arguments(recipe=space.recipe(model=model))


# Overrides.

def override_unknown_key(space: Workspace) -> list[str]:
    return space.arguments(None, None, "steps[0].decompose.rnak.ratio=0.5")


def override_wrong_type(space: Workspace) -> list[str]:
    return space.arguments(None, None, "seed=abc")


def override_missing_item(space: Workspace) -> list[str]:
    return space.arguments(None, None, "steps[7].prune.ratio=0.5")


def override_unclosed_brace(space: Workspace) -> list[str]:
    return space.arguments(None, None, "seed={a")


def override_unclosed_list(space: Workspace) -> list[str]:
    return space.arguments(None, None, "steps[0].decompose.rank.ratio=[1,")


# Data.

def missing_image_folder(space: Workspace) -> list[str]:
    return space.arguments(recipe=space.recipe(data=space.image_data(space.folder / "absent")))


def empty_image_folder(space: Workspace) -> list[str]:
    (space.folder / "empty").mkdir()
    return space.arguments(recipe=space.recipe(data=space.image_data(space.folder / "empty")))


def corrupt_image(space: Workspace) -> list[str]:
    root = space.image_folder("images")
    (root / "class00" / "broken.png").write_bytes(b"not a png")
    return space.arguments(recipe=space.recipe(data=space.image_data(root)))


def images_with_wrong_channels(space: Workspace) -> list[str]:
    root = space.image_folder("images", mode="RGB")
    return space.arguments(recipe=space.recipe(data=space.image_data(root, transform=["to_tensor"])))


def more_classes_than_model(space: Workspace) -> list[str]:
    root = space.image_folder("images", classes=12)
    return space.arguments(recipe=space.recipe(data=space.image_data(root)))


def data_callable_fails(space: Workspace) -> list[str]:
    data = digits_recipe()["data"]
    data["train"]["kwargs"] = {"split": "test"}
    return space.arguments(recipe=space.recipe(data=data))


# Output and resume.

def output_is_file(space: Workspace) -> list[str]:
    space.output.write_text("not a folder")
    return space.arguments(None, None, "--force")


def resume_without_checkpoint(space: Workspace) -> list[str]:
    return space.arguments(None, None, "--resume")


BAD_INPUTS = {
    "missing_model": BadInput(missing_model, "model file not found", process=True),
    "empty_model": BadInput(empty_model, "model file is empty"),
    "truncated_model": BadInput(truncated_model, "the file is corrupt or truncated", process=True),
    "text_model": BadInput(text_model, "is not a PyTorch checkpoint"),
    "onnx_as_pt": BadInput(onnx_as_pt, "is not a PyTorch checkpoint"),
    "zip_not_checkpoint": BadInput(zip_not_checkpoint, "is not a PyTorch checkpoint"),
    "torchscript_model": BadInput(torchscript_model, "is a TorchScript archive"),
    "pickled_module": BadInput(pickled_module, "if you trust it, pass --allow-pickle"),
    "state_dict_not_fitting": BadInput(state_dict_not_fitting, "does not fit the architecture: shape mismatch"),
    "wrong_state_dict_key": BadInput(wrong_state_dict_key, "has no key 'weights' (found ['state_dict'])"),
    "model_is_folder": BadInput(model_is_folder, "model path is not a file"),
    "corrupt_safetensors": BadInput(corrupt_safetensors, "not a valid safetensors file"),
    "safetensors_with_key": BadInput(safetensors_with_key, "set model.state_dict_key to auto or null"),
    "missing_recipe": BadInput(missing_recipe, "file not found"),
    "recipe_is_folder": BadInput(recipe_is_folder, "is a folder, expected a YAML file"),
    "bad_yaml": BadInput(bad_yaml, "is not valid YAML", process=True),
    "recipe_top_level_list": BadInput(recipe_top_level_list, "expected a mapping at the top level, found list"),
    "unknown_key": BadInput(unknown_key, "stesp: unknown key (did you mean 'steps'?)"),
    "wrong_type": BadInput(wrong_type, "seed: Input should be a valid integer"),
    "ratio_above_one": BadInput(ratio_above_one, "steps[0].decompose.rank.ratio: Input should be less than or equal to 1"),
    "negative_epochs": BadInput(negative_epochs, "steps[0].finetune.epochs: Input should be greater than 0"),
    "finetune_without_train_data": BadInput(finetune_without_train_data, "finetune step but no data.train"),
    "rank_with_separable": BadInput(rank_with_separable, "rank, rank_in and rank_out apply to forms bottleneck"),
    "unknown_architecture_module": BadInput(unknown_architecture_module, "cannot import module 'examples.no_such_module'"),
    "architecture_without_callable": BadInput(architecture_without_callable, "is not 'package.module:callable'"),
    "unknown_step": BadInput(unknown_step, "steps[0]: unknown step 'quantize'"),
    "input_shape_not_fitting": BadInput(input_shape_not_fitting, "the model fails on an input of shape [1, 3, 8, 8]"),
    "override_unknown_key": BadInput(override_unknown_key, "steps[0].decompose.rnak: unknown key"),
    "override_wrong_type": BadInput(override_wrong_type, "seed: Input should be a valid integer", process=True),
    "override_missing_item": BadInput(override_missing_item, "no list item [7] in the recipe"),
    "override_unclosed_brace": BadInput(override_unclosed_brace, "override 'seed={a': the value '{a' is not valid YAML"),
    "override_unclosed_list": BadInput(override_unclosed_list, "the value '[1,' is not valid YAML", process=True),
    "missing_image_folder": BadInput(missing_image_folder, "data.val.image_folder not found"),
    "empty_image_folder": BadInput(empty_image_folder, "is not an ImageFolder (one sub-folder per class)"),
    "corrupt_image": BadInput(corrupt_image, "broken.png: unknown or corrupt image format", process=True),
    "images_with_wrong_channels": BadInput(images_with_wrong_channels,
                                           "data.val gives inputs of shape [3, 8, 8], but model.input_shape is [1, 8, 8]"),
    "more_classes_than_model": BadInput(more_classes_than_model,
                                        "data.val has labels from 0 to 11, but the model outputs 10 classes"),
    "data_callable_fails": BadInput(data_callable_fails, "data.train.callable 'examples.digits:digits_dataset' failed"),
    "output_is_file": BadInput(output_is_file, "exists and is not a folder"),
    "resume_without_checkpoint": BadInput(resume_without_checkpoint, "cannot resume: no checkpoint found"),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Return the bytes of every file under ``folder``, by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case_id", list(BAD_INPUTS))
def test_bad_input_rejected(case_id: str, tmp_path: Path, digits_checkpoint: Path, run_cli) -> None:
    case = BAD_INPUTS[case_id]
    space = Workspace(tmp_path, digits_checkpoint)
    arguments = case.make(space)
    output_before = space.output.read_bytes() if space.output.is_file() else None
    files_before = snapshot(tmp_path)

    if case.process:
        completed = run_cli_process(*arguments, cwd=tmp_path)
        result = CliResult(completed.returncode, completed.stdout, completed.stderr)
    else:
        result = run_cli(*arguments)

    assert result.exit_code == 2, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith("slimmer: error: ")
    assert case.fragment in result.stderr_lines[0]
    assert not space.output.is_dir()
    assert (space.output.read_bytes() if space.output.is_file() else None) == output_before
    assert not work_dir(space.output).exists()
    assert list(tmp_path.glob(".out.partial-*")) == []
    assert snapshot(tmp_path) == files_before


def test_cases_distinct() -> None:
    assert len(BAD_INPUTS) >= 25
    assert len({case.make for case in BAD_INPUTS.values()}) == len(BAD_INPUTS)
    assert len({case.fragment for case in BAD_INPUTS.values()}) >= 25


def test_some_cases_as_processes() -> None:
    assert sum(case.process for case in BAD_INPUTS.values()) >= 5


@pytest.mark.parametrize("override", ["seed={a", 'seed="x', "seed='x", "steps[0].decompose.rank.ratio=[1,"])
def test_validate_rejects_invalid_yaml_override(override: str, tmp_path: Path, run_cli) -> None:
    recipe = write_yaml(tmp_path / "recipe.yaml", digits_recipe())

    result = run_cli("validate", recipe, override)

    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith(f"slimmer: error: invalid override: override {override!r}: the value ")
    assert "is not valid YAML" in result.stderr_lines[0]
    assert "close its brackets, braces and quotes" in result.stderr_lines[0]


def test_override_without_equals_rejected(tmp_path: Path, digits_checkpoint: Path) -> None:
    space = Workspace(tmp_path, digits_checkpoint)

    completed = run_cli_process(*space.arguments(None, None, "seed"), cwd=tmp_path)

    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    assert completed.stderr.strip().splitlines()[-1] == ("slimmer: error: unrecognized arguments: seed; recipe "
                                                         "overrides are written key=value, for example seed=1")
    assert not space.output.exists()
