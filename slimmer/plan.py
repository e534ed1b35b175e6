"""Budget planner: give each layer the option that reaches a model-wide cost target with the least error.

For every candidate layer the planner lists its options: keep it, Tucker-2 bottlenecks over a
grid of input and output ranks that are multiples of ``round_to``, and separable pairs with
channel multiplier K. Each option has its MACs, parameters, optionally measured onnxruntime
latency, and its relative output error ``E||y - ŷ||² / E||y||²`` on calibration images (see
:mod:`slimmer.decompose.datafit`). Allocation then minimizes the sum of the layers' errors
subject to the budget. Each layer's options are reduced to the lower convex hull of
(cost, error). A greedy loop then repeatedly takes the hull step with the least error added per
unit of cost saved, until the model fits the target. On convex per-layer curves this greedy
order is the exact solution of the Lagrangian relaxation of the knapsack problem; it can miss
the optimum only by the one step that crosses the budget.

A bottleneck rank below the channel count is the same model as pruning that many channels of
the bottleneck's 1x1 layers, so the rank grid covers channel pruning of the new layers.
NOTE: 1x1 convolutions that the original model already has are not options here; pruning them
stays with the prune step, outside the budget.
"""

from __future__ import annotations

import copy
import heapq
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimmer.cost import LayerShape, count_macs, count_params, measure_latency
from slimmer.decompose.datafit import LayerFitter, collect_moments
from slimmer.errors import CheckFailedError
from slimmer.graph import set_module
from slimmer.latency_table import LatencyTable
from slimmer.recipe import DecomposeConfig, TargetConfig

logger = logging.getLogger(__name__)

# At most this many ranks per mode are tried, evenly spaced multiples of round_to.
MAX_RANKS_PER_MODE = 16
# Rounds of planning, measuring and tightening for a latency target.
LATENCY_ROUNDS = 3
# A latency plan aims this share below the target, because a fresh measurement of the same model
# varies by about 1 to 2% between runs on a shared machine (bench/bench_resnet.py records).
LATENCY_MARGIN = 0.02
MODEL_LATENCY_RUNS = 50


@dataclass
class Option:
    """One way to run a layer, with its costs and relative output error."""

    form: str
    settings: dict[str, int]
    macs: int
    params: int
    error: float
    latency_ms: float | None = None

    def cost(self, metric: str) -> float:
        if metric == "latency":
            assert self.latency_ms is not None
            return self.latency_ms
        return float(getattr(self, metric))

    def describe(self) -> str:
        if self.form == "keep":
            return "keep"
        values = ", ".join(f"{key}={value}" for key, value in self.settings.items())
        return f"{self.form} ({values})"

    def to_dict(self) -> dict[str, Any]:
        return {"option": self.describe(), "form": self.form, **self.settings, "macs": self.macs,
                "params": self.params, "latency_ms": self.latency_ms, "error": self.error}


@dataclass
class LayerOptions:
    """A layer's options (``options[0]`` keeps it), the lower hull through them and the planned choice."""

    name: str
    conv: nn.Conv2d
    shape: LayerShape
    fitter: LayerFitter
    options: list[Option]
    hull: list[int] = field(default_factory=list)
    step: int = 0
    weight: float = 1.0

    @property
    def chosen(self) -> Option:
        return self.options[self.hull[self.step]]


def rank_grid(channels: int, round_to: int) -> list[int]:
    """Ranks tried for a mode: multiples of ``round_to`` below ``channels``, thinned to at most 16, plus ``channels``."""
    multiples = list(range(round_to, channels, round_to))
    if len(multiples) > MAX_RANKS_PER_MODE - 1:
        stride = math.ceil(len(multiples) / (MAX_RANKS_PER_MODE - 1))
        multiples = multiples[stride - 1::stride]
    return multiples + [channels]


def layer_options(name: str, conv: nn.Conv2d, shape: LayerShape, fitter: LayerFitter, config: DecomposeConfig,
                  latency: LatencyTable | None) -> LayerOptions:
    """List the options of one layer that lower both its MACs and parameters, with their errors."""
    from slimmer.decompose import (bottleneck_macs, bottleneck_params, conv_macs, conv_params, full_multiplier,
                                   separable_macs, separable_params)
    from slimmer.decompose.tucker import bottleneck_from_conv
    from slimmer.decompose.separable import separable_from_conv

    macs, params = conv_macs(conv, shape), conv_params(conv)
    input_shape = tuple(shape.input_shape[1:])
    keep = Option("keep", {}, macs, params, 0.0, latency.latency_ms(conv, input_shape) if latency else None)
    options = [keep]

    if config.form in ("bottleneck", "auto"):
        ranks_out = rank_grid(conv.out_channels, config.round_to)
        for rank_in in rank_grid(conv.in_channels, config.round_to):
            paying = [rank_out for rank_out in ranks_out
                      if (rank_in, rank_out) != (conv.in_channels, conv.out_channels)
                      and bottleneck_macs(conv, shape, rank_in, rank_out) < macs
                      and bottleneck_params(conv, rank_in, rank_out) < params]
            if not paying:
                continue
            errors = fitter.bottleneck_errors(rank_in, paying)
            for rank_out in paying:
                option = Option("bottleneck", {"rank_in": rank_in, "rank_out": rank_out},
                                bottleneck_macs(conv, shape, rank_in, rank_out),
                                bottleneck_params(conv, rank_in, rank_out), errors[rank_out])
                if latency:
                    option.latency_ms = latency.latency_ms(bottleneck_from_conv(conv, rank_in, rank_out), input_shape)
                options.append(option)

    if config.form in ("separable", "auto"):
        for multiplier in range(1, full_multiplier(conv) + 1):
            if separable_macs(conv, shape, multiplier) >= macs or separable_params(conv, multiplier) >= params:
                continue
            option = Option("separable", {"multiplier": multiplier}, separable_macs(conv, shape, multiplier),
                            separable_params(conv, multiplier), fitter.separable_error(multiplier))
            if latency:
                option.latency_ms = latency.latency_ms(separable_from_conv(conv, multiplier), input_shape)
            options.append(option)
    return LayerOptions(name, conv, shape, fitter, options)


def lower_hull(options: list[Option], metric: str) -> list[int]:
    """Indices of the lower convex hull of (cost, error), from ``options[0]`` (keep) towards lower cost."""
    hull = [0]
    while True:
        current = options[hull[-1]]
        best, best_slope = None, math.inf
        for index, option in enumerate(options):
            saved = current.cost(metric) - option.cost(metric)
            if saved <= 0:
                continue
            slope = (option.error - current.error) / saved
            if slope < best_slope - 1e-15:
                best, best_slope = index, slope
        if best is None:
            return hull
        hull.append(best)


def allocate(layers: list[LayerOptions], metric: str, total_cost: float, target_cost: float) -> float:
    """Take hull steps, least error per saved cost first, until ``total_cost`` fits ``target_cost``; return the planned cost."""
    for layer in layers:
        layer.hull = lower_hull(layer.options, metric)
        layer.step = 0

    def next_step(index: int) -> tuple[float, int] | None:
        layer = layers[index]
        if layer.step + 1 >= len(layer.hull):
            return None
        current, following = layer.options[layer.hull[layer.step]], layer.options[layer.hull[layer.step + 1]]
        slope = layer.weight * (following.error - current.error) / (current.cost(metric) - following.cost(metric))
        return slope, index

    queue = [entry for entry in (next_step(index) for index in range(len(layers))) if entry is not None]
    heapq.heapify(queue)
    cost = total_cost
    while cost > target_cost and queue:
        _, index = heapq.heappop(queue)
        layer = layers[index]
        before = layer.chosen.cost(metric)
        layer.step += 1
        cost -= before - layer.chosen.cost(metric)
        entry = next_step(index)
        if entry is not None:
            heapq.heappush(queue, entry)
    return cost


@dataclass
class Plan:
    """The planner's outcome: per-layer choices and the costs it expects."""

    metric: str
    target_share: float
    original_cost: float
    planned_cost: float
    smallest_cost: float
    layers: list[LayerOptions]
    calibration: str
    seconds: float = 0.0
    measured_share: float | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)
    measurement: dict[str, int] = field(default_factory=dict)

    @property
    def planned_share(self) -> float:
        return self.planned_cost / self.original_cost

    def summary(self) -> dict[str, Any]:
        return {"metric": self.metric, "target": self.target_share, "planned": self.planned_share,
                "measured": self.measured_share, "smallest_reachable": self.smallest_cost / self.original_cost,
                "original_cost": self.original_cost, "planned_cost": self.planned_cost,
                "total_error": sum(layer.chosen.error for layer in self.layers), "calibration": self.calibration,
                "layers_changed": sum(layer.chosen.form != "keep" for layer in self.layers),
                "layers_kept": sum(layer.chosen.form == "keep" for layer in self.layers),
                "rounds": self.rounds, "seconds": self.seconds, **self.measurement}

    def sensitivity(self) -> list[dict[str, Any]]:
        """Per layer: the chosen option and every option on its hull, with costs and errors."""
        rows = []
        for layer in self.layers:
            rows.append({"name": layer.name, "chosen": layer.chosen.describe(), "error": layer.chosen.error,
                         "output_weight": layer.weight,
                         "hull": [layer.options[index].to_dict() for index in layer.hull],
                         "options": [option.to_dict() for option in layer.options]})
        return rows


@torch.no_grad()
def weigh_by_output(model: nn.Module, layers: list[LayerOptions], images: torch.Tensor) -> None:
    """Set each layer's weight to the model output error per unit of its own output error.

    Layer errors do not all cost the same: the planner probes each layer alone with its hull
    option nearest half its MACs, measures the relative error of the model's outputs on
    ``images`` and divides by the layer's own error. Allocation then minimizes the sum of
    weighted errors, a first-order estimate of the model output error.
    """
    from slimmer.cost import output_tensors
    from slimmer.graph import get_module

    was_training = model.training
    model.eval()
    reference = output_tensors(model(images))
    energy = sum(float(tensor.pow(2).sum()) for tensor in reference)
    for layer in layers:
        hull = [layer.options[index] for index in lower_hull(layer.options, "macs")][1:]
        if not hull:
            continue
        probe = min(hull, key=lambda option: abs(option.macs - layer.options[0].macs / 2))
        if probe.error <= 0:
            continue
        original = get_module(model, layer.name)
        set_module(model, layer.name, _build_option(layer, probe))
        try:
            outputs = output_tensors(model(images))
        finally:
            set_module(model, layer.name, original)
        change = sum(float((output - base).pow(2).sum()) for output, base in zip(outputs, reference))
        layer.weight = max(change / (energy + 1e-30) / probe.error, 1e-12)
    model.train(was_training)


def unit(metric: str) -> str:
    return {"macs": "MACs", "params": "parameters", "latency": "ms"}[metric]


def _unreachable(target: TargetConfig, original: float, smallest: float, config: DecomposeConfig) -> CheckFailedError:
    metric = target.metric
    amounts = f"{smallest:.3f} of {original:.3f}" if metric == "latency" else f"{smallest:,.0f} of {original:,.0f}"
    return CheckFailedError(
        f"target {metric} {target.share:g} cannot be reached: the smallest reachable {metric} is "
        f"{smallest / original:.3f} of the original ({amounts} {unit(metric)}) with "
        f"form {config.form}, round_to {config.round_to} and the layers selected; raise the target, or widen "
        f"include, lower min_channels or round_to")


def build_planned(model: nn.Module, layers: list[LayerOptions]) -> nn.Module:
    """Replace each layer in ``model`` (in place) by its planned option, initialized data-aware."""
    for layer in layers:
        if layer.chosen.form != "keep":
            set_module(model, layer.name, _build_option(layer, layer.chosen))
    return model


def _build_option(layer: LayerOptions, option: Option) -> nn.Module:
    from slimmer.decompose import like_original

    if option.form == "bottleneck":
        return like_original(layer.conv, layer.fitter.build_bottleneck(option.settings["rank_in"], option.settings["rank_out"]))
    if option.form == "separable":
        return like_original(layer.conv, layer.fitter.build_separable(option.settings["multiplier"]))
    return layer.conv


def _model_latency(models: dict[str, nn.Module], example_input: torch.Tensor, target: TargetConfig,
                   seed: int) -> dict[str, float]:
    from slimmer.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="slimmer-plan-") as folder:
        paths = {label: export_onnx(model, example_input, Path(folder) / f"{label}.onnx")
                 for label, model in models.items()}
        timings = measure_latency(paths, list(example_input.shape[1:]), [target.batch_size], target.threads,
                                  10, MODEL_LATENCY_RUNS, seed)
    return {label: values[target.batch_size]["median"] for label, values in timings.items()}


def plan_decomposition(model: nn.Module, config: DecomposeConfig, example_input: torch.Tensor,
                       selected: list[tuple[str, nn.Conv2d]], shapes: dict[str, LayerShape],
                       calibration_inputs: torch.Tensor | None, seed: int = 0) -> Plan:
    """Plan the selected layers of ``model`` to reach ``config.target`` and rewrite ``model`` in place.

    Raises CheckFailedError when even the cheapest option of every layer misses the target.
    """
    target = config.target
    assert target is not None
    started = time.perf_counter()
    metric = target.metric
    original_model = copy.deepcopy(model) if metric == "latency" else None

    moments: dict[str, torch.Tensor | None]
    if calibration_inputs is not None:
        images = calibration_inputs[:config.calibration_images]
        moments = dict(collect_moments(model, dict(selected), images))
        calibration = f"{len(images)} calibration images"
    else:
        logger.warning("Planning without calibration images: errors are weight approximation errors")
        moments = {name: None for name, _ in selected}
        calibration = "none (weight approximation errors)"

    latency = None
    if metric == "latency":
        cache_file = Path(target.latency_cache) if target.latency_cache else None
        latency = LatencyTable(target.batch_size, target.threads, cache_file)
    layers = []
    for index, (name, conv) in enumerate(selected):
        layers.append(layer_options(name, conv, shapes[name], LayerFitter(conv, moments[name]), config, latency))
        logger.debug("Planned options for %s (%d of %d)", name, index + 1, len(selected))
    if latency is not None:
        if latency.measured:
            logger.info("Measured %d layer latencies; cached in %s", latency.measured, latency.cache_file)
        latency.save()

    if metric == "macs":
        original = float(count_macs(model, example_input)[0])
    elif metric == "params":
        original = float(count_params(model))
    else:
        original = _model_latency({"original": model}, example_input, target, seed)["original"]
    savings = [layer.options[0].cost(metric) - min(option.cost(metric) for option in layer.options)
               for layer in layers]
    smallest = original - sum(max(saving, 0.0) for saving in savings)
    target_cost = target.share * original
    if smallest > target_cost:
        raise _unreachable(target, original, smallest, config)

    if calibration_inputs is not None and config.weigh_by_output:
        weigh_by_output(model, layers, calibration_inputs[:config.weigh_images])
    planned = allocate(layers, metric, original, target_cost)
    plan = Plan(metric, target.share, original, planned, smallest, layers, calibration)
    if metric == "latency":
        plan.measurement = {"batch_size": target.batch_size, "threads": target.threads}
    if metric == "latency":
        assert original_model is not None
        _meet_latency(plan, original_model, model, example_input, target, seed)
    build_planned(model, layers)
    plan.seconds = time.perf_counter() - started
    logger.info("Planned %s at %.3f of the original (target %.3f) in %.1f s: %d layers changed, %d kept",
                metric, plan.planned_share, target.share, plan.seconds,
                sum(layer.chosen.form != "keep" for layer in layers), sum(layer.chosen.form == "keep" for layer in layers))
    return plan


def _meet_latency(plan: Plan, original_model: nn.Module, model: nn.Module, example_input: torch.Tensor,
                  target: TargetConfig, seed: int) -> None:
    """Measure the planned model and tighten the plan while it misses the latency target.

    Per-layer latencies do not add up exactly to a model's (fused batch norm and activations,
    caches). So the plan is checked on the whole exported model and re-allocated with the budget
    scaled by the measured shortfall, for at most ``LATENCY_ROUNDS`` rounds. Every round aims
    ``LATENCY_MARGIN`` below the target.
    """
    goal = plan.target_share * (1 - LATENCY_MARGIN)
    if abs(goal * plan.original_cost - plan.planned_cost) > 1e-9 and plan.smallest_cost <= goal * plan.original_cost:
        plan.planned_cost = allocate(plan.layers, plan.metric, plan.original_cost, goal * plan.original_cost)
    for round_index in range(LATENCY_ROUNDS):
        candidate = build_planned(copy.deepcopy(model), plan.layers)
        timings = _model_latency({"original": original_model, "planned": candidate}, example_input, target, seed)
        measured = timings["planned"] / timings["original"]
        plan.rounds.append({"budget": goal, "planned": plan.planned_share, "measured": measured})
        plan.measured_share = measured
        logger.info("Latency round %d: planned %.3f, measured %.3f of the original (target %.3f)",
                    round_index + 1, plan.planned_share, measured, plan.target_share)
        if measured <= plan.target_share * (1 - LATENCY_MARGIN):
            return
        if round_index + 1 == LATENCY_ROUNDS:
            # NOTE: on a busy machine the whole-model measurements vary by more than the margin, so
            # the rounds can tighten the plan further than the target needs, and two runs can plan
            # differently even with a warm layer cache.
            if measured <= plan.target_share:
                return
            logger.warning("The planned model measures %.3f of the original latency, above the target %.3f, after "
                           "%d rounds; lower the target or measure with more runs", measured, plan.target_share,
                           LATENCY_ROUNDS)
            return
        goal *= plan.target_share * (1 - LATENCY_MARGIN) / measured
        if plan.smallest_cost > goal * plan.original_cost:
            logger.warning("The latency target needs more than the cheapest options give; keeping the cheapest plan")
            goal = plan.smallest_cost / plan.original_cost
        plan.planned_cost = allocate(plan.layers, plan.metric, plan.original_cost, goal * plan.original_cost)
