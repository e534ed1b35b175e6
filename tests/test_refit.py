"""Refit on calibration activations: least squares, the refit pass on real images, batch-norm recalibration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import CIFAR_FOLDER, CIFAR_NORMALIZE, require_shared
from slimmer.data import build_dataset, evaluate_top1, make_loader, sample_inputs
from slimmer.decompose import decompose
from slimmer.decompose.refit import recalibrate_batchnorm, refit, ridge_solve
from slimmer.decompose.tucker import bottleneck_from_conv
from slimmer.recipe import DataConfig, DatasetConfig, DecomposeConfig, RankRule, RefitConfig


def _cifar(split: str, limit: int):
    config = DatasetConfig(image_folder=str(require_shared(CIFAR_FOLDER / split)),
                           transform=["to_tensor", CIFAR_NORMALIZE], limit=limit)
    return build_dataset(config, lambda path: __import__("pathlib").Path(path), [], seed=0)


def test_ridge_solve_recovers_weights():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 6, generator=generator)
    weight = torch.randn(4, 6, generator=generator)
    bias = torch.randn(4, generator=generator)
    found_weight, found_bias = ridge_solve(features, features @ weight.T + bias, ridge=0.0, with_bias=True)
    assert torch.allclose(found_weight.float(), weight, atol=1e-5)
    assert torch.allclose(found_bias.float(), bias, atol=1e-5)


@pytest.mark.parametrize("conv_arguments", [
    {"padding": 1},
    {"padding": 1, "stride": 2},
    {"padding": 2, "dilation": 2, "padding_mode": "reflect"},
], ids=["plain", "stride2", "dilated-reflect"])
def test_core_refit_reduces_error(conv_arguments):
    """A bottleneck without expand refits its k x k core over unfolded patches."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, bias=True, **conv_arguments)
    inputs = torch.randn(64, 16, 12, 12)
    with torch.no_grad():
        target = conv(inputs)
    bottleneck = bottleneck_from_conv(conv, rank_in=4, rank_out=16)
    assert not hasattr(bottleneck, "expand")

    model = nn.Sequential()
    model.add_module("layer", bottleneck)
    original = nn.Sequential()
    original.add_module("layer", conv)
    with torch.no_grad():
        error_before = float((bottleneck(inputs) - target).norm() / target.norm())
    result = refit(model, original, RefitConfig(ridge=0.0, recalibrate_bn=False), inputs)
    error_after = result.changed[0].details["error_after"]
    assert result.changed[0].details["error_before"] == pytest.approx(error_before, rel=1e-4)
    assert error_after < error_before


def test_refit_pass_on_real_images(resnet20, cifar_input):
    """On ResNet-20 at half rank, refit lowers every layer's error and raises top-1 before fine-tuning."""
    calibration = sample_inputs(_cifar("train", 128), 128, [3, 32, 32])
    val_loader = make_loader(_cifar("val", 300), DataConfig(batch_size=300))

    decomposed = decompose(resnet20, DecomposeConfig(rank=RankRule(ratio=0.5), round_to=8), cifar_input).model
    result = refit(decomposed, resnet20, RefitConfig(images=128, recalibrate_bn=True), calibration)

    assert len(result.changed) == 18
    for change in result.changed:
        assert change.details["error_after"] < change.details["error_before"], change.name
    assert result.stats["batchnorm_recalibrated"] == 19
    accuracy_before = evaluate_top1(decomposed, val_loader)
    accuracy_after = evaluate_top1(result.model, val_loader)
    assert accuracy_after > accuracy_before + 20.0


def test_refit_leaves_input_unchanged(resnet20, cifar_input):
    decomposed = decompose(resnet20, DecomposeConfig(rank=RankRule(ratio=0.5)), cifar_input).model
    before = copy.deepcopy(decomposed.state_dict())
    refit(decomposed, resnet20, RefitConfig(images=8), torch.randn(8, 3, 32, 32))
    for key, value in decomposed.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_recalibrate_batchnorm_matches_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    inputs = torch.randn(40, 3, 9, 9) * 3 + 1
    with torch.no_grad():
        features = model[0](inputs)
    count = recalibrate_batchnorm(model, inputs, batch_size=40)
    assert count == 1
    assert torch.allclose(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[1].running_var, features.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)
    assert not model.training


def test_refit_step_needs_data(digits_model):
    import slimmer
    from helpers import digits_recipe

    recipe = digits_recipe(data={}, steps=[{"decompose": {"rank": {"ratio": 0.5}}}, {"refit": {"images": 16}}])
    with pytest.raises(slimmer.InputError, match="data.calibration or data.train"):
        slimmer.apply(digits_model, recipe, progress=False)


def test_refit_step_in_pipeline(digits_model):
    """A refit step between decompose and export keeps ONNX parity and lowers each layer's error."""
    import slimmer
    from helpers import digits_recipe

    recipe = digits_recipe(steps=[{"decompose": {"rank": {"ratio": 0.5}}}, {"refit": {"images": 64}}])
    _, report = slimmer.apply(digits_model, recipe, progress=False)
    refit_pass = next(entry for entry in report["passes"] if entry["pass"] == "refit")

    assert report["parity"]["passed"]
    assert len(refit_pass["changed"]) == 3
    for change in refit_pass["changed"]:
        assert change["details"]["error_after"] < change["details"]["error_before"], change["name"]
