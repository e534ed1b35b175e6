"""ONNX export and parity of a decomposed and pruned model, MAC and parameter counts by hand, latency records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import slimmer
from examples.digits import digits_dataset
from slimmer.errors import CheckFailedError
from slimmer.recipe import DecomposeConfig, PruneConfig, RankRule

DIGITS_INPUT = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))

# onnxruntime folds batch norm into the convolutions, so its float32 sums round differently from
# PyTorch's: measured max |difference| about 5e-7 of the output scale. Allowed: 1e-5 of it.
ONNX_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def compressed_digits(trained_digits: nn.Module) -> nn.Module:
    decomposed = slimmer.decompose(trained_digits, DecomposeConfig(rank=RankRule(ratio=0.5)), DIGITS_INPUT).model
    return slimmer.prune(decomposed, PruneConfig(ratio=0.5), DIGITS_INPUT).model.eval()


@pytest.fixture(scope="module")
def compressed_onnx(compressed_digits: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slimmer.export_onnx(compressed_digits, DIGITS_INPUT, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def digits_images() -> torch.Tensor:
    dataset = digits_dataset("val")
    return torch.stack([dataset[index][0] for index in range(32)])


def test_export_passes_checker(compressed_onnx: Path) -> None:
    proto = onnx.load(str(compressed_onnx))
    onnx.checker.check_model(proto, full_check=True)  # raises on an invalid model

    assert [node.name for node in proto.graph.input] == ["input"]


def test_export_batch_axis_dynamic(compressed_onnx: Path) -> None:
    proto = onnx.load(str(compressed_onnx))
    input_shape = proto.graph.input[0].type.tensor_type.shape.dim
    output_shape = proto.graph.output[0].type.tensor_type.shape.dim

    assert input_shape[0].dim_param == "batch"
    assert output_shape[0].dim_param == "batch"
    assert [dim.dim_value for dim in input_shape[1:]] == [1, 8, 8]


def test_export_conv_count(compressed_digits: nn.Module, compressed_onnx: Path) -> None:
    proto = onnx.load(str(compressed_onnx))
    convs = sum(isinstance(module, nn.Conv2d) for module in compressed_digits.modules())

    assert sum(node.op_type == "Conv" for node in proto.graph.node) == convs


@pytest.mark.parametrize("batch", [1, 5], ids=["batch1", "batch5"])
def test_onnxruntime_matches_torch(compressed_digits: nn.Module, compressed_onnx: Path,
                                   digits_images: torch.Tensor, batch: int) -> None:
    session = ort.InferenceSession(str(compressed_onnx), providers=["CPUExecutionProvider"])
    inputs = digits_images[:batch]
    found = session.run(None, {"input": inputs.numpy()})[0]
    with torch.no_grad():
        expected = compressed_digits(inputs).numpy()

    assert found.shape == expected.shape == (batch, 10)
    assert np.abs(found - expected).max() <= ONNX_TOLERANCE * np.abs(expected).max()


def test_check_parity_passes(compressed_digits: nn.Module, compressed_onnx: Path,
                             digits_images: torch.Tensor) -> None:
    parity = slimmer.check_parity(compressed_onnx, compressed_digits, digits_images, atol=1e-4, rtol=1e-3,
                                  batch_size=5)

    assert parity["passed"] is True
    assert parity["samples"] == 32
    assert parity["max_abs_diff"] <= 1e-4


def test_check_parity_rejects_other_model(trained_digits: nn.Module, compressed_onnx: Path,
                                          digits_images: torch.Tensor) -> None:
    # The ONNX file of the compressed model against the uncompressed PyTorch model.
    with pytest.raises(CheckFailedError, match="differs from PyTorch beyond tolerance"):
        slimmer.check_parity(compressed_onnx, trained_digits, digits_images, atol=1e-4, rtol=1e-3)


class HandCounted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.norm = nn.BatchNorm2d(8)
        self.linear = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.grouped(self.conv(x))))
        return self.linear(x.flatten(1))


def test_count_macs_by_hand() -> None:
    _, per_layer = slimmer.count_macs(HandCounted(), torch.randn(1, 3, 16, 16))

    # conv: 16x16 input, stride 2 -> 8x8 output of 8 channels; each element sums 3 channels x 3x3.
    assert per_layer["conv"] == (8 * 8 * 8) * (3 * 3 * 3)
    # grouped: 8x8x8 output; each element sums 8 / 4 = 2 input channels x 3x3.
    assert per_layer["grouped"] == (8 * 8 * 8) * (2 * 3 * 3)
    # linear: 512 inputs x 10 outputs.
    assert per_layer["linear"] == 512 * 10
    # Batch norm, activations and the flatten are not counted.
    assert set(per_layer) == {"conv", "grouped", "linear"}


def test_count_macs_total_per_sample() -> None:
    expected = (8 * 8 * 8) * (3 * 3 * 3) + (8 * 8 * 8) * (2 * 3 * 3) + 512 * 10

    assert slimmer.count_macs(HandCounted(), torch.randn(1, 3, 16, 16))[0] == expected
    assert slimmer.count_macs(HandCounted(), torch.randn(4, 3, 16, 16))[0] == expected


class TwiceApplied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x))


def test_count_macs_counts_each_call() -> None:
    # 4x4 output of 4 channels, 4 input channels x 1x1, applied twice.
    assert slimmer.count_macs(TwiceApplied(), torch.randn(1, 4, 4, 4))[0] == 2 * (4 * 4 * 4) * 4


def test_count_params_by_hand() -> None:
    # conv 8*3*3*3 + 8, grouped 8*2*3*3 + 8, norm 8 + 8, linear 512*10 + 10.
    expected = (8 * 27 + 8) + (8 * 18 + 8) + (8 + 8) + (512 * 10 + 10)

    assert slimmer.count_params(HandCounted()) == expected


def test_measure_latency_records(compressed_onnx: Path) -> None:
    timings = slimmer.measure_latency({"compressed": compressed_onnx}, [1, 8, 8], batch_sizes=[1, 4],
                                      warmup=2, runs=50)

    assert list(timings) == ["compressed"]
    assert list(timings["compressed"]) == [1, 4]
    for batch, timing in timings["compressed"].items():
        assert timing["median"] > 0, batch
        assert timing["p90"] >= timing["median"], batch
