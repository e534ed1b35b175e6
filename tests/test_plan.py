"""Budget planning: data-aware errors, hull allocation, targets reached, unreachable budgets, reports."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import CIFAR_FOLDER, CIFAR_NORMALIZE, digits_recipe, require_shared, write_yaml
from slimmer.cost import count_macs, count_params
from slimmer.data import build_dataset, sample_inputs
from slimmer.decompose import decompose
from slimmer.decompose.datafit import LayerFitter, collect_moments, refit_bottleneck
from slimmer.decompose.refit import capture_inputs
from slimmer.decompose.tucker import bottleneck_from_conv
from slimmer.errors import CheckFailedError
from slimmer.latency_table import LatencyTable
from slimmer.plan import LayerOptions, Option, allocate, lower_hull, rank_grid
from slimmer.recipe import DecomposeConfig, RecipeError, recipe_from_dict


@pytest.fixture(scope="module")
def cifar_images() -> torch.Tensor:
    """128 real CIFAR-10 training images, normalized as the checkpoints expect."""
    from slimmer.recipe import DatasetConfig

    config = DatasetConfig(image_folder=str(require_shared(CIFAR_FOLDER / "train")),
                           transform=["to_tensor", CIFAR_NORMALIZE], limit=500)
    dataset = build_dataset(config, lambda path: __import__("pathlib").Path(path), [], seed=0)
    return sample_inputs(dataset, 128, [3, 32, 32], seed=0)


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> float:
    return float(((output - target).norm() / target.norm()) ** 2)


def _option(cost: float, error: float) -> Option:
    return Option("bottleneck", {"rank_in": int(cost)}, int(cost), int(cost), error)


def test_rank_grid_respects_round_to():
    assert rank_grid(64, 16) == [16, 32, 48, 64]
    assert rank_grid(20, 8) == [8, 16, 20]
    grid = rank_grid(512, 8)
    assert len(grid) <= 16
    assert grid[-1] == 512
    assert all(rank % 8 == 0 for rank in grid)


def test_lower_hull_drops_dominated_options():
    options = [_option(100, 0.0), _option(80, 0.30), _option(60, 0.10), _option(40, 0.50), _option(20, 0.60)]
    # (80, 0.30) is worse than (60, 0.10); (40, 0.50) lies above the segment (60, 0.10) -> (20, 0.60).
    assert lower_hull(options, "macs") == [0, 2, 4]


def test_allocate_takes_cheapest_error_first():
    layers = []
    for name, error in (("flat", 0.01), ("steep", 0.5)):
        options = [_option(100, 0.0), _option(50, error)]
        layers.append(LayerOptions(name, conv=None, shape=None, fitter=None, options=options))
    cost = allocate(layers, "macs", total_cost=300, target_cost=250)
    assert cost == 250
    assert layers[0].step == 1
    assert layers[1].step == 0


def test_predicted_error_matches_real_output(resnet20, cifar_images):
    """The error computed from second moments equals the replacement's output error on the same images."""
    name = "layer3.1.conv1"
    conv = dict(resnet20.named_modules())[name]
    moments = collect_moments(resnet20, {name: conv}, cifar_images)
    layer_input = capture_inputs(resnet20, [name], cifar_images)[name]
    with torch.no_grad():
        target = conv(layer_input)
    fitter = LayerFitter(conv, moments[name])
    for rank_in, rank_out in ((32, 32), (16, 64), (64, 16)):
        predicted = fitter.bottleneck_errors(rank_in, [rank_out])[rank_out]
        with torch.no_grad():
            actual = _relative_error(fitter.build_bottleneck(rank_in, rank_out)(layer_input), target)
        assert predicted == pytest.approx(actual, rel=0.05, abs=1e-4)


def test_data_aware_init_beats_hosvd(resnet20, cifar_images):
    """At equal ranks, the data-aware bottleneck has a lower output error on real images than HOSVD."""
    names = ["layer1.1.conv1", "layer2.1.conv2", "layer3.2.conv1"]
    convs = {name: dict(resnet20.named_modules())[name] for name in names}
    moments = collect_moments(resnet20, convs, cifar_images)
    inputs = capture_inputs(resnet20, names, cifar_images)
    for name, conv in convs.items():
        ranks = (conv.in_channels // 2, conv.out_channels // 2)
        with torch.no_grad():
            target = conv(inputs[name])
            data_aware = _relative_error(LayerFitter(conv, moments[name]).build_bottleneck(*ranks)(inputs[name]), target)
            weights_only = _relative_error(bottleneck_from_conv(conv, *ranks)(inputs[name]), target)
        assert data_aware < weights_only, name


def test_refit_bottleneck_lowers_error_on_real_images(resnet20, cifar_images):
    name = "layer2.2.conv2"
    conv = dict(resnet20.named_modules())[name]
    layer_input = capture_inputs(resnet20, [name], cifar_images)[name]
    with torch.no_grad():
        target = conv(layer_input)
        bottleneck = bottleneck_from_conv(conv, 16, 16)
        before = _relative_error(bottleneck(layer_input), target)
        refit_bottleneck(bottleneck, layer_input, target, ridge=1e-6)
        after = _relative_error(bottleneck(layer_input), target)
    assert after < 0.8 * before


@pytest.mark.parametrize("metric,share", [("macs", 0.5), ("macs", 0.7), ("params", 0.6)])
def test_target_reached_within_three_percent(resnet20, cifar_input, cifar_images, metric, share):
    config = DecomposeConfig(target={metric: share}, round_to=8, calibration_images=64)
    result = decompose(resnet20, config, cifar_input, calibration_inputs=cifar_images)
    if metric == "macs":
        achieved = count_macs(result.model, cifar_input)[0] / count_macs(resnet20, cifar_input)[0]
    else:
        achieved = count_params(result.model) / count_params(resnet20)
    assert achieved <= share * 1.03
    assert achieved >= share * 0.97
    plan = result.stats["plan"]
    assert plan["planned"] == pytest.approx(achieved, rel=1e-6)
    assert plan["calibration"] == "64 calibration images"


def test_plan_varies_ranks_across_layers(resnet20, cifar_input, cifar_images):
    """Layers do not all get one rank ratio: the planner spends rank where the output error is high."""
    config = DecomposeConfig(target={"macs": 0.5}, round_to=8, calibration_images=64)
    result = decompose(resnet20, config, cifar_input, calibration_inputs=cifar_images)
    settings = {(change.details.get("rank_in"), change.details.get("rank_out"), change.details["macs_before"])
                for change in result.changed}
    assert len(settings) > 3
    errors = [change.details["error"] for change in result.changed]
    assert all(0.0 <= error < 1.0 for error in errors)


def test_output_weights_differ_across_layers(resnet20, cifar_input, cifar_images):
    """Probing each layer alone gives it a positive weight, and the weights are not all equal."""
    config = DecomposeConfig(target={"macs": 0.5}, round_to=8, calibration_images=64, weigh_images=32)
    result = decompose(resnet20, config, cifar_input, calibration_inputs=cifar_images)
    weights = [row["output_weight"] for row in result.stats["sensitivity"]]
    assert all(weight > 0 for weight in weights)
    assert max(weights) > 2 * min(weights)
    unweighted = DecomposeConfig(target={"macs": 0.5}, round_to=8, calibration_images=64, weigh_by_output=False)
    plain = decompose(resnet20, unweighted, cifar_input, calibration_inputs=cifar_images)
    assert all(row["output_weight"] == 1.0 for row in plain.stats["sensitivity"])


def test_plan_is_deterministic(resnet20, cifar_input, cifar_images):
    config = DecomposeConfig(target={"macs": 0.6}, round_to=8, calibration_images=64, form="auto")
    first = decompose(resnet20, config, cifar_input, calibration_inputs=cifar_images)
    second = decompose(resnet20, config, cifar_input, calibration_inputs=cifar_images)
    assert [vars(change) for change in first.changed] == [vars(change) for change in second.changed]
    for (name, tensor), (_, other) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(tensor, other), name


def test_unreachable_target_names_smallest_cost(resnet20, cifar_input):
    config = DecomposeConfig(target={"macs": 0.05}, round_to=8, include=["layer3.*"])
    with pytest.raises(CheckFailedError) as raised:
        decompose(resnet20, config, cifar_input)
    message = str(raised.value)
    assert "target macs 0.05 cannot be reached" in message
    assert "smallest reachable macs is 0." in message
    assert "\n" not in message


def test_plan_without_data_uses_weight_errors(resnet20, cifar_input):
    config = DecomposeConfig(target={"macs": 0.6}, round_to=8)
    result = decompose(resnet20, config, cifar_input)
    assert result.stats["plan"]["calibration"].startswith("none")
    achieved = count_macs(result.model, cifar_input)[0] / count_macs(resnet20, cifar_input)[0]
    assert 0.6 * 0.97 <= achieved <= 0.6 * 1.03


def test_target_excludes_rank_rules():
    raw = digits_recipe(steps=[{"decompose": {"target": {"macs": 0.5}, "rank": {"ratio": 0.5}}}])
    with pytest.raises(RecipeError, match="target plans the ranks, so rank would be ignored"):
        recipe_from_dict(raw)


def test_target_needs_exactly_one_metric():
    raw = digits_recipe(steps=[{"decompose": {"target": {"macs": 0.5, "params": 0.5}}}])
    with pytest.raises(RecipeError, match="exactly one of macs, params or latency"):
        recipe_from_dict(raw)
    raw = digits_recipe(steps=[{"decompose": {"target": {"macs": 1.5}}}])
    with pytest.raises(RecipeError, match=r"steps\[0\]\.decompose\.target\.macs"):
        recipe_from_dict(raw)
    raw = digits_recipe(steps=[{"decompose": {"target": {"macs": 0.5, "batch_size": 8}}}])
    with pytest.raises(RecipeError, match="batch_size apply to a latency target only"):
        recipe_from_dict(raw)


def test_latency_table_is_cached(tmp_path):
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    cache = tmp_path / "latency.json"
    table = LatencyTable(batch_size=2, threads=1, cache_file=cache)
    first = table.latency_ms(conv, (16, 8, 8))
    table.latency_ms(conv, (16, 8, 8))
    assert table.measured == 1
    assert first > 0
    table.save()
    reloaded = LatencyTable(batch_size=2, threads=1, cache_file=cache)
    assert reloaded.latency_ms(conv, (16, 8, 8)) == first
    assert reloaded.measured == 0
    other_batch = LatencyTable(batch_size=4, threads=1, cache_file=cache)
    other_batch.latency_ms(conv, (16, 8, 8))
    assert other_batch.measured == 1


def test_latency_target_on_digits(digits_model, tmp_path):
    """A latency target plans from measured layer latencies and checks the whole model."""
    config = DecomposeConfig(target={"latency": 0.9, "batch_size": 16, "latency_cache": str(tmp_path / "cache.json")},
                             round_to=16, min_channels=16)
    example = torch.randn(1, 1, 8, 8)
    result = decompose(digits_model, config, example, calibration_inputs=torch.randn(64, 1, 8, 8))
    plan = result.stats["plan"]
    assert plan["metric"] == "latency"
    assert plan["rounds"]
    assert plan["measured"] == plan["rounds"][-1]["measured"]
    assert (tmp_path / "cache.json").is_file()
    assert all(option["latency_ms"] > 0 for layer in result.stats["sensitivity"] for option in layer["options"])


def test_cli_writes_plan_and_sensitivity(digits_checkpoint, tmp_path, run_cli):
    recipe = digits_recipe(steps=[{"decompose": {"target": {"macs": 0.6}, "min_channels": 16}},
                                  {"refit": {"images": 64}}])
    path = write_yaml(tmp_path / "recipe.yaml", recipe)
    result = run_cli("apply", path, digits_checkpoint, "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "sensitivity" not in report
    assert report["plan"][0]["target"] == 0.6
    assert report["plan"][0]["achieved"] == pytest.approx(report["ratios"]["macs"])
    assert report["plan"][0]["achieved"] <= 0.6 * 1.03
    sensitivity = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert {row["name"] for row in sensitivity} == {"features.3", "features.7", "features.10"}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Plan" in markdown
    assert "## Sensitivity" in markdown


def test_cli_unreachable_target_exit_code(digits_checkpoint, tmp_path, run_cli):
    recipe = digits_recipe(steps=[{"decompose": {"target": {"macs": 0.01}, "min_channels": 16}}])
    path = write_yaml(tmp_path / "recipe.yaml", recipe)
    result = run_cli("apply", path, digits_checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 3
    assert "smallest reachable macs" in result.stderr
    assert not (tmp_path / "out").exists()

