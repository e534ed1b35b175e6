"""Loading model files: every rejected kind through the API and through the CLI, and compressed round trips."""

from __future__ import annotations

import io
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import slimmer
from examples.digits import DigitsCNN
from helpers import REPOSITORY, RESNET20_ARCHITECTURE, RESNET20_CHECKPOINT, digits_recipe, write_yaml
from slimmer.errors import ModelLoadError
from slimmer.layers import TuckerBottleneck


def small_sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()


def checkpoint_bytes(resnet20: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": resnet20.state_dict()}, buffer)
    return buffer.getvalue()


def write_zip_without_checkpoint(path: Path, resnet20: nn.Module) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")


def write_onnx(path: Path, resnet20: nn.Module) -> None:
    slimmer.export_onnx(small_sequential(), torch.randn(1, 3, 8, 8), path)


def write_truncated(path: Path, resnet20: nn.Module) -> None:
    data = checkpoint_bytes(resnet20)
    path.write_bytes(data[: len(data) // 2])


def write_torchscript(path: Path, resnet20: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, yet users still have such files
        torch.jit.script(small_sequential()).save(str(path))


@dataclass
class BadModelFile:
    """A model file the loader must reject, and the fragments its message must contain."""

    write: Callable[[Path, nn.Module], None] | None  # None: the file is not created
    fragments: tuple[str, ...]
    load_arguments: dict = field(default_factory=dict)
    overrides: tuple[str, ...] = ()


BAD_MODEL_FILES = {
    "missing": BadModelFile(None, ("model file not found",)),
    "empty": BadModelFile(lambda path, _: path.write_bytes(b""), ("model file is empty",)),
    "text": BadModelFile(lambda path, _: path.write_text("weights: none\n"), ("is not a PyTorch checkpoint",)),
    "onnx_as_pt": BadModelFile(write_onnx, ("is not a PyTorch checkpoint",)),
    "zip_not_checkpoint": BadModelFile(write_zip_without_checkpoint, ("is not a PyTorch checkpoint",)),
    "truncated": BadModelFile(write_truncated, ("corrupt or truncated",)),
    "torchscript": BadModelFile(write_torchscript, ("is a TorchScript archive",)),
    "pickled_module": BadModelFile(lambda path, _: torch.save(small_sequential(), path), ("--allow-pickle",)),
    "wrong_architecture": BadModelFile(
        lambda path, _: torch.save({"state_dict": DigitsCNN().state_dict()}, path),
        ("does not fit the architecture", "missing keys: conv1.weight", "unexpected keys: features.0.weight")),
    "wrong_state_dict_key": BadModelFile(
        lambda path, resnet20: torch.save({"state_dict": resnet20.state_dict()}, path),
        ("has no key 'weights'", "found ['state_dict']"),
        {"state_dict_key": "weights"}, ("model.state_dict_key=weights",)),
    "no_architecture": BadModelFile(
        lambda path, resnet20: torch.save(resnet20.state_dict(), path),
        ("set model.architecture",), {"architecture": None}, ("model.architecture=null",)),
}


def make_model_file(case: BadModelFile, folder: Path, resnet20: nn.Module) -> Path:
    folder.mkdir()
    path = folder / "model.pt"
    if case.write is not None:
        case.write(path, resnet20)
    return path


@pytest.mark.parametrize("case_id", list(BAD_MODEL_FILES))
def test_load_model_rejects(case_id: str, tmp_path: Path, resnet20: nn.Module) -> None:
    case = BAD_MODEL_FILES[case_id]
    path = make_model_file(case, tmp_path / "input", resnet20)
    arguments = {"architecture": RESNET20_ARCHITECTURE, "search_path": [REPOSITORY], **case.load_arguments}

    with pytest.raises(ModelLoadError) as raised:
        slimmer.load_model(path, **arguments)
    for fragment in case.fragments:
        assert fragment in str(raised.value)


@pytest.fixture
def resnet20_recipe(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "recipe.yaml", {
        "model": {"architecture": RESNET20_ARCHITECTURE, "python_path": [str(REPOSITORY)], "input_shape": [3, 32, 32]},
        "report": {"latency": {"enabled": False}},
    })


@pytest.mark.parametrize("case_id", list(BAD_MODEL_FILES))
def test_cli_rejects_model(case_id: str, tmp_path: Path, resnet20: nn.Module, resnet20_recipe: Path,
                           run_cli) -> None:
    case = BAD_MODEL_FILES[case_id]
    path = make_model_file(case, tmp_path / "input", resnet20)
    original_bytes = path.read_bytes() if path.exists() else None
    output = tmp_path / "out"

    result = run_cli("apply", resnet20_recipe, path, "-o", output, *case.overrides)

    assert result.exit_code == 2
    assert len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith("slimmer: error: ")
    for fragment in case.fragments:
        assert fragment in result.stderr_lines[0]
    assert not output.exists()
    assert list(tmp_path.glob(".out.partial-*")) == []
    assert (path.read_bytes() if path.exists() else None) == original_bytes


def test_load_pickled_module_allowed(tmp_path: Path) -> None:
    module = small_sequential()
    torch.save(module, tmp_path / "model.pt")
    loaded = slimmer.load_model(tmp_path / "model.pt", allow_pickle=True)
    inputs = torch.randn(2, 3, 8, 8)

    assert isinstance(loaded, nn.Sequential)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(inputs), module(inputs))


def test_load_strips_module_prefix() -> None:
    checkpoint = torch.load(RESNET20_CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
    model = slimmer.load_model(RESNET20_CHECKPOINT, RESNET20_ARCHITECTURE, search_path=[REPOSITORY])
    loaded = model.state_dict()

    assert sorted(f"module.{key}" for key in loaded) == sorted(checkpoint)
    assert all(torch.equal(value, checkpoint[f"module.{key}"]) for key, value in loaded.items())
    assert not model.training


def test_load_without_strip_reports_prefix() -> None:
    with pytest.raises(ModelLoadError) as raised:
        slimmer.load_model(RESNET20_CHECKPOINT, RESNET20_ARCHITECTURE, strip_prefix=None, search_path=[REPOSITORY])

    assert "unexpected keys: module.conv1.weight" in str(raised.value)
    assert "missing keys: conv1.weight" in str(raised.value)


def test_load_bare_state_dict(tmp_path: Path, resnet20: nn.Module) -> None:
    torch.save(resnet20.state_dict(), tmp_path / "bare.pt")
    loaded = slimmer.load_model(tmp_path / "bare.pt", RESNET20_ARCHITECTURE, search_path=[REPOSITORY])

    assert all(torch.equal(value, resnet20.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_load_partial_prefix_kept(tmp_path: Path, resnet20: nn.Module) -> None:
    # A prefix is stripped only when every key has it; otherwise the keys stay as they are.
    state_dict = resnet20.state_dict()
    state_dict["module.extra"] = state_dict.pop("linear.bias")
    torch.save(state_dict, tmp_path / "partial.pt")

    with pytest.raises(ModelLoadError, match="unexpected keys: module.extra"):
        slimmer.load_model(tmp_path / "partial.pt", RESNET20_ARCHITECTURE, search_path=[REPOSITORY])


# Round trips of out/model.pt written by apply.

DIGITS_ARCHITECTURE_RECORD = {"architecture": "examples.digits:digits_cnn", "kwargs": {},
                              "python_path": [str(REPOSITORY)]}


@pytest.fixture(scope="module")
def applied_digits(trained_digits: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    output = tmp_path_factory.mktemp("apply") / "out"
    compressed, _ = slimmer.apply(trained_digits, digits_recipe(), output_dir=output, progress=False,
                                  architecture=DIGITS_ARCHITECTURE_RECORD)
    return compressed, output


def digits_inputs() -> torch.Tensor:
    return torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(4))


def test_load_compressed_round_trip(applied_digits: tuple[nn.Module, Path]) -> None:
    compressed, output = applied_digits
    loaded = slimmer.load_compressed(output / "model.pt")
    with torch.no_grad():
        expected = compressed(digits_inputs())
        found = loaded(digits_inputs())

    assert torch.equal(found, expected)


def test_load_compressed_keeps_ranks(applied_digits: tuple[nn.Module, Path]) -> None:
    compressed, output = applied_digits
    loaded = slimmer.load_compressed(output / "model.pt")

    def ranks(model: nn.Module) -> dict[str, tuple[int, int]]:
        return {name: (module.rank_in, module.rank_out) for name, module in model.named_modules()
                if isinstance(module, TuckerBottleneck)}

    assert ranks(loaded) == ranks(compressed)
    assert len(ranks(loaded)) == 3


def test_load_model_reads_compressed(applied_digits: tuple[nn.Module, Path]) -> None:
    compressed, output = applied_digits
    loaded = slimmer.load_model(output / "model.pt")
    with torch.no_grad():
        assert torch.equal(loaded(digits_inputs()), compressed(digits_inputs()))


@pytest.fixture(scope="module")
def applied_without_architecture(trained_digits: nn.Module,
                                 tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    output = tmp_path_factory.mktemp("apply-pickled") / "out"
    recipe = digits_recipe(data={}, steps=[{"decompose": {"rank": {"ratio": 0.5}}}])
    compressed, _ = slimmer.apply(trained_digits, recipe, output_dir=output, progress=False, architecture=None)
    return compressed, output


def test_pickled_compressed_needs_opt_in(applied_without_architecture: tuple[nn.Module, Path]) -> None:
    _, output = applied_without_architecture
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        slimmer.load_compressed(output / "model.pt")


def test_pickled_compressed_loads_with_opt_in(applied_without_architecture: tuple[nn.Module, Path]) -> None:
    compressed, output = applied_without_architecture
    loaded = slimmer.load_compressed(output / "model.pt", allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(loaded(digits_inputs()), compressed(digits_inputs()))


def test_cli_allow_pickle_loads(tmp_path: Path, run_cli) -> None:
    module = small_sequential()
    torch.save(module, tmp_path / "model.pt")
    recipe = write_yaml(tmp_path / "recipe.yaml", {"model": {"input_shape": [3, 8, 8]},
                                                   "report": {"latency": {"enabled": False}}})

    result = run_cli("apply", recipe, tmp_path / "model.pt", "-o", tmp_path / "out", "--allow-pickle", "--quiet")
    loaded = slimmer.load_compressed(tmp_path / "out" / "model.pt", allow_pickle=True)
    inputs = torch.randn(2, 3, 8, 8)

    assert result.exit_code == 0, result.stderr
    with torch.no_grad():
        assert torch.equal(loaded(inputs), module(inputs))


def test_cli_pickle_ignores_recipe_architecture(tmp_path: Path, run_cli, trained_digits: nn.Module) -> None:
    """A pickled module is saved pickled even when the recipe also names an architecture."""
    torch.save(trained_digits, tmp_path / "model.pt")
    recipe = write_yaml(tmp_path / "recipe.yaml", digits_recipe(
        data={}, steps=[{"decompose": {"rank": {"ratio": 0.5}}}]))

    result = run_cli("apply", recipe, tmp_path / "model.pt", "-o", tmp_path / "out", "--allow-pickle", "--quiet")
    loaded = slimmer.load_compressed(tmp_path / "out" / "model.pt", allow_pickle=True)

    assert result.exit_code == 0, result.stderr
    with torch.no_grad():
        assert loaded(digits_inputs()).shape == (len(digits_inputs()), 10)


def test_api_output_loads_without_pickle(trained_digits: nn.Module, tmp_path: Path) -> None:
    """slimmer.apply records the recipe's architecture, so its model.pt loads with weights_only."""
    recipe = digits_recipe(data={}, steps=[{"decompose": {"rank": {"ratio": 0.5}}}])
    compressed, _ = slimmer.apply(trained_digits, recipe, output_dir=tmp_path / "out", progress=False)
    loaded = slimmer.load_compressed(tmp_path / "out" / "model.pt")
    with torch.no_grad():
        assert torch.equal(loaded(digits_inputs()), compressed(digits_inputs()))


# safetensors files: a flat state_dict read with the optional safetensors package.

def save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    return path


@pytest.fixture
def resnet20_safetensors(tmp_path: Path) -> Path:
    """The trained ResNet-20 checkpoint converted to safetensors, keys with their ``module.`` prefix."""
    checkpoint = torch.load(RESNET20_CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
    return save_safetensors(checkpoint, tmp_path / "resnet20.safetensors")


def test_load_safetensors_resnet20(resnet20_safetensors: Path, loaded_resnet20: nn.Module) -> None:
    model = slimmer.load_model(resnet20_safetensors, RESNET20_ARCHITECTURE, search_path=[REPOSITORY])
    expected = loaded_resnet20.state_dict()

    assert model.state_dict().keys() == expected.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not model.training


def test_load_safetensors_upper_case_suffix(tmp_path: Path, resnet20: nn.Module) -> None:
    path = save_safetensors(resnet20.state_dict(), tmp_path / "resnet20.SAFETENSORS")
    model = slimmer.load_model(path, RESNET20_ARCHITECTURE, search_path=[REPOSITORY])

    assert torch.equal(model.linear.weight, resnet20.linear.weight)


def test_cli_applies_safetensors(tmp_path: Path, trained_digits: nn.Module, run_cli) -> None:
    path = save_safetensors(trained_digits.state_dict(), tmp_path / "digits.safetensors")
    recipe = write_yaml(tmp_path / "recipe.yaml", digits_recipe(steps=[{"decompose": {"rank": {"ratio": 0.5}}}]))
    original_bytes = path.read_bytes()

    result = run_cli("apply", recipe, path, "-o", tmp_path / "out", "--quiet", "model.state_dict_key=auto")
    compressed = slimmer.load_compressed(tmp_path / "out" / "model.pt")

    assert result.exit_code == 0, result.stderr
    assert isinstance(compressed, nn.Module)
    assert path.read_bytes() == original_bytes


@pytest.mark.parametrize(("content", "fragment"), [
    pytest.param(b"not a safetensors file at all", "not a valid safetensors file", id="text"),
    pytest.param(b"\x10\x00\x00\x00\x00\x00\x00\x00{", "not a valid safetensors file", id="short_header"),
    pytest.param(b"\x04\x00\x00\x00\x00\x00\x00\x00{ab}", "not a valid safetensors file", id="broken_json"),
    pytest.param(b"", "model file is empty", id="empty"),
])
def test_load_safetensors_corrupt(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)

    with pytest.raises(ModelLoadError) as raised:
        slimmer.load_model(path, RESNET20_ARCHITECTURE, search_path=[REPOSITORY])
    assert fragment in str(raised.value)


def test_load_safetensors_truncated(resnet20_safetensors: Path) -> None:
    data = resnet20_safetensors.read_bytes()
    resnet20_safetensors.write_bytes(data[: len(data) - 100])

    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        slimmer.load_model(resnet20_safetensors, RESNET20_ARCHITECTURE, search_path=[REPOSITORY])


def test_safetensors_rejects_state_dict_key(resnet20_safetensors: Path) -> None:
    with pytest.raises(ModelLoadError) as raised:
        slimmer.load_model(resnet20_safetensors, RESNET20_ARCHITECTURE, state_dict_key="state_dict",
                           search_path=[REPOSITORY])

    assert "is a safetensors file, which contains one flat state_dict" in str(raised.value)
    assert "set model.state_dict_key to auto or null" in str(raised.value)


def test_safetensors_package_missing(resnet20_safetensors: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import raise ImportError, as on a machine without the package.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)

    with pytest.raises(ModelLoadError) as raised:
        slimmer.load_model(resnet20_safetensors, RESNET20_ARCHITECTURE, search_path=[REPOSITORY])
    assert "needs the safetensors package: pip install safetensors" in str(raised.value)


def test_safetensors_content_in_pt_file(resnet20_safetensors: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "resnet20.pt"
    renamed.write_bytes(resnet20_safetensors.read_bytes())

    with pytest.raises(ModelLoadError, match="looks like a safetensors file; rename it to end in .safetensors"):
        slimmer.load_model(renamed, RESNET20_ARCHITECTURE, search_path=[REPOSITORY])
