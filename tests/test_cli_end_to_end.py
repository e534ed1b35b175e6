"""``slimmer apply`` end to end: the digits demo and ResNet-20 as separate processes, and exit codes 2 and 3."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import slimmer
from examples.digits import digits_dataset
from helpers import (CIFAR_FOLDER, CIFAR_NORMALIZE, OUTPUT_FILES, REPOSITORY, RESNET20_ARCHITECTURE,
                     RESNET20_CHECKPOINT, digits_recipe, require_shared, run_cli_process, write_yaml)
from slimmer.data import evaluate_top1, make_loader
from slimmer.recipe import DataConfig, load_recipe

SUMMARY_KEYS = {"params", "macs", "onnx_bytes", "latency_ms", "accuracy"}


def read_report(output: Path) -> dict[str, Any]:
    return json.loads((output / "report.json").read_text(encoding="utf-8"))


# The digits demo recipe, run as a shell user would, with the latency protocol cut to its minimum.

@pytest.fixture(scope="module")
def digits_run(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    folder = tmp_path_factory.mktemp("digits-cli")
    output = folder / "out"
    completed = run_cli_process("apply", REPOSITORY / "recipes" / "digits-demo.yaml", digits_checkpoint, "-o", output,
                                "report.latency.runs=50", "report.latency.batch_sizes=[1]", cwd=folder)
    return completed, output


@pytest.fixture(scope="module")
def digits_report(digits_run: tuple[subprocess.CompletedProcess, Path]) -> dict[str, Any]:
    completed, output = digits_run
    assert completed.returncode == 0, completed.stderr
    return read_report(output)


def test_digits_cli_exit_code(digits_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    completed, _ = digits_run
    assert completed.returncode == 0, completed.stderr


def test_digits_cli_prints_summary(digits_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    completed, output = digits_run
    assert "| MACs " in completed.stdout
    assert f"Wrote {output}/: model.onnx, model.pt, report.json, report.md, recipe.resolved.yaml" in completed.stdout


@pytest.mark.parametrize("name", OUTPUT_FILES)
def test_digits_cli_writes_file(digits_run: tuple[subprocess.CompletedProcess, Path], name: str) -> None:
    _, output = digits_run
    assert (output / name).is_file()
    assert (output / name).stat().st_size > 0


def test_digits_cli_writes_only_outputs(digits_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, output = digits_run
    assert sorted(path.name for path in output.iterdir()) == sorted(OUTPUT_FILES)
    assert [path.name for path in output.parent.iterdir() if path.name.startswith(".out.partial")] == []


@pytest.mark.parametrize("side", ["original", "compressed"])
def test_digits_report_summary_keys(digits_report: dict[str, Any], side: str) -> None:
    assert SUMMARY_KEYS <= set(digits_report[side])


def test_digits_report_macs_lower(digits_report: dict[str, Any]) -> None:
    assert digits_report["compressed"]["macs"] < digits_report["original"]["macs"]


def test_digits_report_params_lower(digits_report: dict[str, Any]) -> None:
    assert digits_report["compressed"]["params"] < digits_report["original"]["params"]


def test_digits_report_accuracy_numbers(digits_report: dict[str, Any]) -> None:
    for side in ("original", "compressed"):
        accuracy = digits_report[side]["accuracy"]
        assert isinstance(accuracy, float), side
        assert 0.0 <= accuracy <= 100.0, side


def test_digits_report_original_accuracy(digits_report: dict[str, Any], trained_digits: nn.Module) -> None:
    # The report's figure must be the model's top-1 on the validation split, computed here independently.
    expected = evaluate_top1(trained_digits, make_loader(digits_dataset("val"), DataConfig()))
    assert digits_report["original"]["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_digits_report_parity_passed(digits_report: dict[str, Any]) -> None:
    parity = digits_report["parity"]

    assert parity["passed"] is True
    assert parity["samples"] == 64
    assert parity["max_abs_diff"] <= parity["atol"] + parity["rtol"] * 100


def test_digits_report_latency_batch1(digits_report: dict[str, Any]) -> None:
    for side in ("original", "compressed"):
        assert list(digits_report[side]["latency_ms"]) == ["1"], side
        assert digits_report[side]["latency_ms"]["1"]["median"] > 0, side
    assert digits_report["latency_protocol"]["runs"] == 50


def test_digits_report_onnx_bytes(digits_report: dict[str, Any],
                                  digits_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, output = digits_run
    assert digits_report["compressed"]["onnx_bytes"] == (output / "model.onnx").stat().st_size


def test_digits_report_layers(digits_report: dict[str, Any]) -> None:
    rows = {row["name"]: row for row in digits_report["layers"]}
    rewritten = [name for name, row in rows.items() if row["after"].startswith("bottleneck")]

    assert set(rows) == {"features.0", "features.3", "features.7", "features.10", "classifier"}
    assert rewritten == ["features.3", "features.7", "features.10"]
    assert sum(row["macs_after"] for row in rows.values()) == digits_report["compressed"]["macs"]


def test_digits_report_markdown(digits_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, output = digits_run
    markdown = (output / "report.md").read_text(encoding="utf-8")

    assert markdown.startswith("# slimmer report: digits-demo\n")
    assert "(tolerance atol=0.0001, rtol=0.001): passed." in markdown


def test_digits_resolved_recipe(digits_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, output = digits_run
    recipe = load_recipe(output / "recipe.resolved.yaml")

    assert recipe.name == "digits-demo"
    assert recipe.report.latency.batch_sizes == [1]
    assert [type(step).__name__ for step in recipe.steps] == ["DecomposeStep", "PruneStep", "FinetuneStep"]


def test_digits_outputs_agree(digits_run: tuple[subprocess.CompletedProcess, Path],
                              digits_report: dict[str, Any]) -> None:
    _, output = digits_run
    model = slimmer.load_compressed(output / "model.pt")
    session = ort.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = torch.stack([digits_dataset("val")[index][0] for index in range(3)])
    with torch.no_grad():
        expected = model(inputs).numpy()
    found = session.run(None, {"input": inputs.numpy()})[0]

    assert np.abs(found - expected).max() <= 1e-5 * np.abs(expected).max()
    assert slimmer.count_macs(model, inputs)[0] == digits_report["compressed"]["macs"]


# ResNet-20 on a small subset of the CIFAR-10 JPEG images.

@pytest.fixture(scope="module")
def resnet20_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    folder = tmp_path_factory.mktemp("resnet20-cli")
    train = require_shared(CIFAR_FOLDER / "train")
    val = require_shared(CIFAR_FOLDER / "val")
    recipe = write_yaml(folder / "resnet20.yaml", {
        "name": "resnet20-test",
        "model": {"architecture": RESNET20_ARCHITECTURE, "python_path": [str(REPOSITORY)],
                  "state_dict_key": "state_dict", "input_shape": [3, 32, 32]},
        "data": {"train": {"image_folder": str(train), "transform": ["to_tensor", CIFAR_NORMALIZE]},
                 "val": {"image_folder": str(val), "transform": ["to_tensor", CIFAR_NORMALIZE]},
                 "batch_size": 100},
        "steps": [{"decompose": {"include": ["layer2.*", "layer3.*"], "rank": {"ratio": 0.5}}},
                  {"prune": {"ratio": 0.25}},
                  {"finetune": {"epochs": 1, "batch_size": 32, "lr": 0.001}}],
        "export": {"parity": {"samples": 16}},
        "report": {"latency": {"batch_sizes": [1], "warmup": 2, "runs": 50}},
    })
    output = folder / "out"
    completed = run_cli_process("apply", recipe, require_shared(RESNET20_CHECKPOINT), "-o", output, "--quiet",
                                "data.train.limit=256", "data.val.limit=200", "steps[2].finetune.steps=2", cwd=folder)
    return completed, output


@pytest.fixture(scope="module")
def resnet20_report(resnet20_run: tuple[subprocess.CompletedProcess, Path]) -> dict[str, Any]:
    completed, output = resnet20_run
    assert completed.returncode == 0, completed.stderr
    return read_report(output)


def test_resnet20_cli_exit_code(resnet20_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    completed, _ = resnet20_run
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == ""  # --quiet


def test_resnet20_original_accuracy(resnet20_report: dict[str, Any]) -> None:
    # 87.5% top-1 on all 5,000 validation images; 200 of them stay well above 75% unless loading
    # (normalization, class order, weights) is wrong, which gives about 10%.
    assert resnet20_report["original"]["accuracy"] >= 75.0


def test_resnet20_macs_lower(resnet20_report: dict[str, Any]) -> None:
    assert resnet20_report["compressed"]["macs"] < resnet20_report["original"]["macs"]


def test_resnet20_macs_original(resnet20_report: dict[str, Any], loaded_resnet20: nn.Module) -> None:
    assert resnet20_report["original"]["macs"] == slimmer.count_macs(loaded_resnet20, torch.zeros(1, 3, 32, 32))[0]


def test_resnet20_parity_passed(resnet20_report: dict[str, Any]) -> None:
    assert resnet20_report["parity"]["passed"] is True
    assert resnet20_report["parity"]["samples"] == 16


def test_resnet20_finetune_steps(resnet20_report: dict[str, Any]) -> None:
    finetune = [record for record in resnet20_report["passes"] if record["pass"] == "finetune"]
    assert [record["stats"]["steps"] for record in finetune] == [2]


def test_resnet20_resolved_limits(resnet20_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, output = resnet20_run
    recipe = load_recipe(output / "recipe.resolved.yaml")

    assert recipe.data.train.limit == 256
    assert recipe.data.val.limit == 200


# Exit codes 2 and 3, run in this process (fast) on the digits model.

@pytest.fixture
def digits_recipe_file(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "recipe.yaml", digits_recipe())


def test_existing_output_needs_force(tmp_path: Path, digits_checkpoint: Path, digits_recipe_file: Path,
                                     run_cli) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")

    result = run_cli("apply", digits_recipe_file, digits_checkpoint, "-o", output)

    assert result.exit_code == 2
    assert result.stderr_lines == [f"slimmer: error: output folder {output} already exists and is not empty; "
                                   "pass --force (force=True from Python) to replace it"]
    assert sorted(path.name for path in output.iterdir()) == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "earlier results"


def test_force_replaces_output(tmp_path: Path, digits_checkpoint: Path, digits_recipe_file: Path, run_cli) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")

    result = run_cli("apply", digits_recipe_file, digits_checkpoint, "-o", output, "--force", "--quiet")

    assert result.exit_code == 0, result.stderr
    assert sorted(path.name for path in output.iterdir()) == sorted(OUTPUT_FILES)


def test_output_containing_model_rejected(tmp_path: Path, digits_checkpoint: Path, digits_recipe_file: Path,
                                          run_cli) -> None:
    output = tmp_path / "out"
    output.mkdir()
    model = output / "model.pt"
    model.write_bytes(digits_checkpoint.read_bytes())

    result = run_cli("apply", digits_recipe_file, model, "-o", output, "--force")

    assert result.exit_code == 2
    assert "contains the input model" in result.stderr
    assert model.read_bytes() == digits_checkpoint.read_bytes()


STATEFUL_MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class CallCounter(nn.Module):
        """Adds the number of forward calls so far: ONNX tracing records that count as a constant."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.conv(x) + self.calls


    def call_counter():
        return CallCounter()
''')


def test_parity_failure_exit_code(tmp_path: Path, run_cli) -> None:
    (tmp_path / "stateful_model_for_parity.py").write_text(STATEFUL_MODEL, encoding="utf-8")
    state_dict = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}
    torch.save({"state_dict": state_dict}, tmp_path / "model.pt")
    recipe = write_yaml(tmp_path / "recipe.yaml", {
        "model": {"architecture": "stateful_model_for_parity:call_counter", "python_path": [str(tmp_path)],
                  "input_shape": [3, 8, 8]},
        "report": {"latency": {"enabled": False}},
    })
    output = tmp_path / "out"

    result = run_cli("apply", recipe, tmp_path / "model.pt", "-o", output, "--quiet")

    assert result.exit_code == 3
    assert "ONNX output differs from PyTorch beyond tolerance" in result.stderr
    assert not output.exists()
    assert list(tmp_path.glob(".out.partial-*")) == []


def test_api_existing_output_needs_force(tmp_path: Path, trained_digits: nn.Module) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")
    recipe = digits_recipe(data={}, steps=[{"decompose": {"rank": {"ratio": 0.5}}}])

    with pytest.raises(slimmer.InputError, match="already exists"):
        slimmer.apply(trained_digits, recipe, output_dir=output)
    assert (output / "keep.txt").read_text() == "earlier results"

    slimmer.apply(trained_digits, recipe, output_dir=output, force=True)
    assert (output / "report.json").is_file()
    assert not (output / "keep.txt").exists()


def test_quiet_hides_warnings(tmp_path: Path, digits_checkpoint: Path, run_cli) -> None:
    # Without steps, nothing is decomposed or pruned, which the run reports as a warning.
    recipe = write_yaml(tmp_path / "recipe.yaml", digits_recipe(data={}, steps=[]))

    loud = run_cli("apply", recipe, digits_checkpoint, "-o", tmp_path / "loud")
    quiet = run_cli("apply", recipe, digits_checkpoint, "-o", tmp_path / "quiet", "--quiet")

    assert loud.exit_code == 0, loud.stderr
    assert "WARNING slimmer.pipeline: No layer was decomposed or pruned" in loud.stderr
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == ""
    assert quiet.stdout == ""


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_modes_follow_umask(tmp_path: Path, trained_digits: nn.Module, umask: int, folder_mode: int,
                                   file_mode: int) -> None:
    recipe = digits_recipe(data={}, steps=[{"decompose": {"rank": {"ratio": 0.5}}}])
    output = tmp_path / "out"
    previous = os.umask(umask)
    try:
        slimmer.apply(trained_digits, recipe, output_dir=output, progress=False)
    finally:
        os.umask(previous)

    assert stat.S_IMODE(output.stat().st_mode) == folder_mode
    for path in output.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path.name


def test_resolved_recipe_reruns_elsewhere(tmp_path: Path, digits_checkpoint: Path, run_cli,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(2):
        (tmp_path / "images" / f"class{index}").mkdir(parents=True)
        Image.new("L", (8, 8), color=60 * index).save(tmp_path / "images" / f"class{index}" / "0.png")
    # Two levels down, so that the relative paths name no folder when read from the output folder.
    (tmp_path / "recipes" / "digits").mkdir(parents=True)
    recipe = digits_recipe(data={"val": {"image_folder": "../../images", "transform": ["grayscale", "to_tensor"]}},
                           steps=[{"decompose": {"rank": {"ratio": 0.5}}}])
    recipe["model"]["python_path"] = [os.path.relpath(REPOSITORY, tmp_path / "recipes" / "digits")]
    path = write_yaml(tmp_path / "recipes" / "digits" / "recipe.yaml", recipe)
    monkeypatch.chdir(tmp_path)

    first = run_cli("apply", path, digits_checkpoint, "-o", tmp_path / "first", "--quiet")
    resolved = yaml.safe_load((tmp_path / "first" / "recipe.resolved.yaml").read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path / "first")
    second = run_cli("apply", "recipe.resolved.yaml", digits_checkpoint, "-o", tmp_path / "second", "--quiet")

    assert first.exit_code == 0, first.stderr
    assert resolved["model"]["python_path"] == [str(REPOSITORY)]
    assert resolved["data"]["val"]["image_folder"] == str((tmp_path / "images").resolve())
    assert read_report(tmp_path / "first")["recipe_resolved"] == resolved
    assert second.exit_code == 0, second.stderr
    assert read_report(tmp_path / "second")["recipe_resolved"] == resolved
