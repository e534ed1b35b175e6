"""Depthwise-separable factorization: exactness at full channel multiplier, error shrinking with K, ONNX parity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimmer.decompose.separable import separable_factors, separable_from_conv
from slimmer.export import check_parity, export_onnx
from slimmer.layers import SeparableConv

CASES = {
    "stride2": {"in_channels": 6, "out_channels": 12, "kernel_size": 3, "padding": 1, "stride": 2},
    "dilation2": {"in_channels": 6, "out_channels": 12, "kernel_size": 3, "padding": 2, "dilation": 2},
    "bias": {"in_channels": 6, "out_channels": 12, "kernel_size": 3, "padding": 1, "bias": True},
    "kernel3x5": {"in_channels": 6, "out_channels": 12, "kernel_size": (3, 5), "padding": (1, 2)},
    "reflect": {"in_channels": 6, "out_channels": 12, "kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    "out-below-kernel": {"in_channels": 6, "out_channels": 4, "kernel_size": 3, "padding": 1},
}


@pytest.mark.parametrize("arguments", CASES.values(), ids=CASES.keys())
def test_separable_exact_at_full_multiplier(arguments):
    torch.manual_seed(0)
    conv = nn.Conv2d(**{"bias": False, **arguments}).double()
    full = min(conv.out_channels, conv.kernel_size[0] * conv.kernel_size[1])
    module = separable_from_conv(conv, full)
    inputs = torch.randn(2, conv.in_channels, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(inputs)
        found = module(inputs)
    assert found.shape == expected.shape
    assert (found - expected).abs().max().item() <= 1e-10 * expected.abs().max().item()


def test_separable_keeps_conv_settings():
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", bias=True)
    module = separable_from_conv(conv, 2)
    assert module.depthwise.groups == 12
    assert module.depthwise.out_channels == 12
    assert module.in_channels == 6
    assert module.multiplier == 2
    assert module.depthwise.stride == (2, 2)
    assert module.depthwise.dilation == (2, 2)
    assert module.depthwise.padding_mode == "reflect"
    assert module.depthwise.bias is None
    assert module.pointwise.bias is not None


def test_separable_error_shrinks_with_multiplier():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    inputs = torch.randn(4, 8, 10, 10)
    with torch.no_grad():
        expected = conv(inputs)
        errors = [float((separable_from_conv(conv, k)(inputs) - expected).norm() / expected.norm()) for k in range(1, 10)]
    for smaller, larger in zip(errors, errors[1:]):
        assert larger < smaller
    assert errors[-1] < 1e-5


def test_separable_multiplier_out_of_range():
    with pytest.raises(ValueError, match="channel multiplier 10"):
        separable_factors(torch.randn(16, 8, 3, 3), 10)


def test_separable_rejects_grouped_conv():
    with pytest.raises(ValueError, match="groups=2"):
        separable_from_conv(nn.Conv2d(8, 8, 3, groups=2), 1)


def test_separable_spec_round_trip():
    module = separable_from_conv(nn.Conv2d(6, 12, (3, 5), stride=2, padding=(1, 2), bias=True), 3)
    rebuilt = SeparableConv.from_spec(module.spec())
    rebuilt.load_state_dict(module.state_dict())
    inputs = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs), module(inputs))


def test_separable_onnx_parity(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(separable_from_conv(nn.Conv2d(8, 16, 3, padding=1, bias=True), 4), nn.ReLU()).eval()
    example = torch.randn(1, 8, 12, 12)
    path = export_onnx(model, example, tmp_path / "separable.onnx")
    parity = check_parity(path, model, torch.randn(6, 8, 12, 12), atol=1e-5, rtol=1e-4)
    assert parity["passed"]
    assert parity["samples"] == 6
