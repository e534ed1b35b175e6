"""Compare allocations and refit on ResNet-56 before fine-tuning, at the same MACs.

    python bench/bench_plan.py            # writes bench/out/plan-comparison.json

Variants, all over every 3x3 convolution of the residual stages, with bottleneck ranks that are
multiples of 8:

- planned: forms and ranks from the budget planner for 0.5 of the original MACs, as the recipe
  recipes/resnet56-target-macs.yaml plans them (layer errors weighed by their effect on the
  model output);
- planned with bottlenecks only (no separable options);
- planned on layer errors alone (``weigh_by_output: false``);
- uniform: one rank ratio for every layer, chosen so the MACs come closest to the planned ones.

Each variant is measured with data-aware initialization alone and after the recipe's refit step.
The uniform ratio is also measured with the data-free initialization of HOSVD on the weights.
bench/bench_resnet.py reads the JSON into docs/results.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from slimmer.cost import count_macs, record_shapes  # noqa: E402
from slimmer.data import build_dataset, evaluate_top1, make_loader, sample_inputs  # noqa: E402
from slimmer.decompose.datafit import LayerFitter, collect_moments  # noqa: E402
from slimmer.decompose.ranks import round_rank  # noqa: E402
from slimmer.decompose.refit import refit  # noqa: E402
from slimmer.decompose.tucker import bottleneck_from_conv  # noqa: E402
from slimmer.graph import iter_convolutions, set_module  # noqa: E402
from slimmer.model_io import load_model  # noqa: E402
from slimmer.pipeline import search_path  # noqa: E402
from slimmer.plan import allocate, build_planned, layer_options, weigh_by_output  # noqa: E402
from slimmer.recipe import DecomposeStep, RefitStep, load_recipe  # noqa: E402

RECIPE = REPOSITORY / "recipes" / "resnet56-target-macs.yaml"
CHECKPOINT = REPOSITORY.parent / "shared" / "models" / "resnet56-cifar10-jpeg.th"
OUTPUT = REPOSITORY / "bench" / "out" / "plan-comparison.json"
TARGET = 0.5


def uniform_choice(layers, ratio: float, round_to: int) -> None:
    """Point every layer at the bottleneck option with both ranks at ``ratio`` of its channels."""
    for layer in layers:
        ranks = {"rank_in": round_rank(ratio * layer.conv.in_channels, round_to, layer.conv.in_channels),
                 "rank_out": round_rank(ratio * layer.conv.out_channels, round_to, layer.conv.out_channels)}
        matching = [index for index, option in enumerate(layer.options)
                    if option.form == "bottleneck" and option.settings == ranks]
        layer.hull = [0] + matching
        layer.step = len(layer.hull) - 1


def planned_macs(layers, fixed_macs: int) -> int:
    return fixed_macs + sum(layer.chosen.macs for layer in layers)


def main() -> int:
    torch.manual_seed(0)
    recipe = load_recipe(RECIPE)
    model = load_model(CHECKPOINT, recipe.model.architecture, recipe.model.kwargs, recipe.model.state_dict_key,
                       recipe.model.strip_prefix, search_path=search_path(recipe)).eval()
    example = torch.randn(1, *recipe.model.input_shape)
    folders = search_path(recipe)
    config = next(step.decompose for step in recipe.steps if isinstance(step, DecomposeStep))
    refit_config = next(step.refit for step in recipe.steps if isinstance(step, RefitStep))
    assert config.target is not None and config.target.macs == TARGET
    assert refit_config.images == config.calibration_images, "the comparison assumes one calibration set"
    calibration = sample_inputs(build_dataset(recipe.data.calibration, recipe.resolve_path, folders, recipe.seed),
                                config.calibration_images, recipe.model.input_shape, recipe.seed)
    val_loader = make_loader(build_dataset(recipe.data.val, recipe.resolve_path, folders, 0), recipe.data)

    shapes = record_shapes(model, example)
    selected = [(name, conv) for name, conv in iter_convolutions(model)
                if name.startswith("layer") and conv.kernel_size == (3, 3)]
    started = time.perf_counter()
    moments = collect_moments(model, dict(selected), calibration)
    layers = [layer_options(name, conv, shapes[name], LayerFitter(conv, moments[name]), config, None)
              for name, conv in selected]
    total, per_layer = count_macs(model, example)
    fixed = total - sum(per_layer[name] for name, _ in selected)
    allocate(layers, "macs", total, TARGET * total)
    layer_errors_only = {layer.name: dict(layer.chosen.settings) for layer in layers}
    layer_errors_total = planned_macs(layers, fixed)
    weigh_by_output(model, layers, calibration[:config.weigh_images])
    allocate(layers, "macs", total, TARGET * total)
    planning_s = time.perf_counter() - started
    planned = {layer.name: dict(layer.chosen.settings) for layer in layers}
    planned_total = planned_macs(layers, fixed)

    bottleneck_layers = [dataclasses.replace(layer, options=[option for option in layer.options
                                                             if option.form != "separable"])
                         for layer in layers]
    allocate(bottleneck_layers, "macs", total, TARGET * total)
    bottleneck_only = {layer.name: dict(layer.chosen.settings) for layer in bottleneck_layers}
    bottleneck_total = planned_macs(bottleneck_layers, fixed)

    def uniform_macs(ratio: float) -> int:
        uniform_choice(layers, ratio, 8)
        return planned_macs(layers, fixed)

    ratios = [step / 100 for step in range(20, 90)]
    best_ratio = min(ratios, key=lambda ratio: abs(uniform_macs(ratio) - planned_total))
    uniform_choice(layers, best_ratio, 8)
    uniform = {layer.name: dict(layer.chosen.settings) for layer in layers}
    uniform_total = planned_macs(layers, fixed)

    results = {"original_top1": evaluate_top1(model, val_loader), "planning_s": planning_s,
               "calibration_images": config.calibration_images, "refit": refit_config.model_dump(), "uniform_ratio": best_ratio, "variants": []}
    print(f"original top-1 {results['original_top1']:.2f}", flush=True)

    def measure(label: str, compressed, macs: int) -> None:
        row = {"variant": label, "macs_ratio": macs / total}
        row["top1_init"] = evaluate_top1(compressed, val_loader)
        started = time.perf_counter()
        refit(compressed, model, refit_config, calibration[:refit_config.images], inplace=True)
        row["refit_s"] = time.perf_counter() - started
        row["top1_refit"] = evaluate_top1(compressed, val_loader)
        print(row, flush=True)
        results["variants"].append(row)

    variants = (("planned", planned, planned_total), ("planned, bottlenecks only", bottleneck_only, bottleneck_total),
                ("planned on layer errors alone", layer_errors_only, layer_errors_total),
                (f"uniform ratio {best_ratio}", uniform, uniform_total))
    for label, choice, macs in variants:
        for layer in layers:
            matching = [index for index, option in enumerate(layer.options)
                        if option.form != "keep" and option.settings == choice[layer.name]]
            layer.hull = [0] + matching
            layer.step = len(layer.hull) - 1
        measure(f"{label}, data-aware init", build_planned(_copy(model), layers), macs)

    data_free = _copy(model)
    for name, conv in selected:
        ranks = uniform[name]
        if ranks:
            set_module(data_free, name, bottleneck_from_conv(conv, ranks["rank_in"], ranks["rank_out"]))
    measure(f"uniform ratio {best_ratio}, HOSVD init (data-free)", data_free, uniform_total)

    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {OUTPUT}")
    return 0


def _copy(model):
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    sys.exit(main())
