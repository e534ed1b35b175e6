"""Decompose forms: separable, auto's per-layer choice, multiplier rules, and convolutions left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimmer
from slimmer.decompose import choose_multiplier
from slimmer.decompose.refit import refit
from slimmer.export import check_parity, export_onnx
from slimmer.layers import SeparableConv, TuckerBottleneck
from slimmer.recipe import DecomposeConfig, RankRule, RefitConfig

FORMS = {
    "bottleneck": {"form": "bottleneck", "rank": RankRule(ratio=0.5)},
    "separable": {"form": "separable", "multiplier": RankRule(fixed=2)},
    "auto": {"form": "auto", "rank": RankRule(ratio=0.5)},
}


class GroupedNet(nn.Module):
    """A dense 3x3, a grouped 3x3 and a depthwise 3x3 convolution in a row."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(16, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(torch.relu(self.grouped(torch.relu(self.dense(x)))))


@pytest.mark.parametrize("form", FORMS, ids=FORMS.keys())
def test_grouped_convs_left_alone(form):
    model = GroupedNet().eval()
    result = slimmer.decompose(model, DecomposeConfig(**FORMS[form]), torch.randn(1, 16, 12, 12),
                               calibration_inputs=torch.randn(8, 16, 12, 12))
    reasons = {skip.name: skip.reason for skip in result.skipped}

    assert [change.name for change in result.changed] == ["dense"]
    assert "groups=4" in reasons["grouped"]
    assert "groups=32" in reasons["depthwise"]
    assert result.model.grouped.groups == 4
    assert result.model.depthwise.groups == 32


@pytest.mark.parametrize("form", FORMS, ids=FORMS.keys())
def test_forms_lower_macs_and_params(form, resnet20, cifar_input):
    result = slimmer.decompose(resnet20, DecomposeConfig(**FORMS[form]), cifar_input,
                               calibration_inputs=torch.randn(16, 3, 32, 32))
    assert len(result.changed) == 18
    for change in result.changed:
        assert change.details["macs_after"] < change.details["macs_before"], change.name
        assert change.details["params_after"] < change.details["params_before"], change.name

    _, per_layer = slimmer.count_macs(result.model, cifar_input)
    for change in result.changed:
        counted = sum(macs for name, macs in per_layer.items() if name.startswith(change.name + "."))
        assert counted == change.details["macs_after"], change.name


def test_separable_pass_builds_multiplier(resnet20, cifar_input):
    config = DecomposeConfig(form="separable", multiplier=RankRule(fixed=3), include=["layer2.*"])
    result = slimmer.decompose(resnet20, config, cifar_input)
    module = result.model.layer2[1].conv1

    assert isinstance(module, SeparableConv)
    assert module.multiplier == 3
    assert module.depthwise.in_channels == 32 * 3
    assert result.changed[0].details["form"] == "separable"


def test_auto_within_bottleneck_budget(resnet20, cifar_input):
    """Auto never spends more MACs on a layer than the bottleneck at the same ranks would."""
    images = torch.randn(16, 3, 32, 32)
    bottleneck = slimmer.decompose(resnet20, DecomposeConfig(**FORMS["bottleneck"]), cifar_input)
    auto = slimmer.decompose(resnet20, DecomposeConfig(**FORMS["auto"]), cifar_input, calibration_inputs=images)
    budget = {change.name: change.details["macs_after"] for change in bottleneck.changed}

    for change in auto.changed:
        assert change.details["macs_after"] <= budget[change.name], change.name
        assert change.details["reason"].startswith("auto: "), change.name


def _single_layer(weight: torch.Tensor) -> nn.Sequential:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    model = nn.Sequential()
    model.add_module("conv", conv)
    return model.eval()


def test_auto_picks_exact_separable():
    """A kernel with one spatial filter per input channel is exactly separable at K = 1."""
    generator = torch.Generator().manual_seed(0)
    filters = torch.randn(32, 9, generator=generator)
    mixing = torch.randn(32, 32, generator=generator)
    weight = torch.einsum("oi,ik->oik", mixing, filters).reshape(32, 32, 3, 3)
    config = DecomposeConfig(form="auto", rank=RankRule(fixed=16), round_to=8)

    result = slimmer.decompose(_single_layer(weight), config, torch.randn(1, 32, 10, 10),
                               calibration_inputs=torch.randn(16, 32, 10, 10, generator=generator))

    assert result.changed[0].details["form"] == "separable"
    assert result.changed[0].details["error"] < 1e-3


def test_auto_picks_exact_bottleneck():
    """A kernel of Tucker rank (16, 16) is exact as a bottleneck at those ranks, where K = 2 fits too."""
    generator = torch.Generator().manual_seed(0)
    core = torch.randn(16, 16, 3, 3, generator=generator)
    factor_out = torch.randn(32, 16, generator=generator)
    factor_in = torch.randn(32, 16, generator=generator)
    weight = torch.einsum("rskl,or,is->oikl", core, factor_out, factor_in)
    config = DecomposeConfig(form="auto", rank=RankRule(fixed=16), round_to=8)

    result = slimmer.decompose(_single_layer(weight), config, torch.randn(1, 32, 10, 10),
                               calibration_inputs=torch.randn(16, 32, 10, 10, generator=generator))

    assert result.changed[0].details["form"] == "bottleneck"
    assert result.changed[0].details["error"] < 1e-3
    assert "separable (multiplier=2)" in result.changed[0].details["reason"]
    assert isinstance(result.model.conv, TuckerBottleneck)


def test_multiplier_rules():
    conv = nn.Conv2d(8, 16, 3)
    assert choose_multiplier(RankRule(fixed=20), conv) == 9
    assert choose_multiplier(RankRule(ratio=0.5), conv) == 5
    assert choose_multiplier(RankRule(energy=1.0), conv) == 9

    narrow = nn.Conv2d(8, 4, 3)
    assert choose_multiplier(RankRule(fixed=9), narrow) == 4


def test_multiplier_energy_rank_one():
    weight = torch.einsum("oi,ik->oik", torch.randn(16, 8), torch.randn(8, 9)).reshape(16, 8, 3, 3)
    conv = nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        conv.weight.copy_(weight)
    assert choose_multiplier(RankRule(energy=0.999), conv) == 1


def test_refit_lowers_separable_error(resnet20, cifar_input):
    config = DecomposeConfig(form="separable", multiplier=RankRule(fixed=1), include=["layer3.*"])
    decomposed = slimmer.decompose(resnet20, config, cifar_input).model
    result = refit(decomposed, resnet20, RefitConfig(images=16, recalibrate_bn=False), torch.randn(16, 3, 32, 32))

    assert len(result.changed) == 6
    for change in result.changed:
        assert change.details["error_after"] < change.details["error_before"], change.name


def test_separable_model_onnx_parity(resnet20, cifar_input, tmp_path):
    config = DecomposeConfig(form="separable", multiplier=RankRule(fixed=2))
    model = slimmer.decompose(resnet20, config, cifar_input).model
    path = export_onnx(model, cifar_input, tmp_path / "separable.onnx")
    parity = check_parity(path, model, torch.randn(8, 3, 32, 32), atol=1e-4, rtol=1e-3)
    assert parity["passed"]


def test_auto_pipeline_round_trip(digits_model, tmp_path):
    """Auto through slimmer.apply: ONNX parity passes and model.pt rebuilds both forms."""
    from helpers import REPOSITORY, digits_recipe

    from examples.digits import digits_dataset

    recipe = digits_recipe(steps=[{"decompose": {"form": "auto", "rank": {"ratio": 0.5}}}])
    compressed, report = slimmer.apply(digits_model, recipe, output_dir=tmp_path / "out",
                                       architecture={"architecture": "examples.digits:digits_cnn", "kwargs": {},
                                                     "python_path": [str(REPOSITORY)]})
    loaded = slimmer.load_compressed(tmp_path / "out" / "model.pt")
    images = torch.stack([digits_dataset("val")[index][0] for index in range(8)])

    assert report["parity"]["passed"]
    with torch.no_grad():
        assert torch.equal(loaded(images), compressed(images))
