"""Decompose pass: replace selected k x k convolutions by low-rank forms initialized from their weights."""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from dataclasses import dataclass
from typing import Callable

from slimmer.cost import LayerShape, record_shapes
from slimmer.decompose.ranks import choose_rank, energy_rank
from slimmer.decompose.refit import capture_inputs, refit_last_layer
from slimmer.decompose.separable import channel_singular_values, separable_from_conv
from slimmer.decompose.tucker import bottleneck_from_conv, mode_singular_values
from slimmer.graph import iter_convolutions, matches, modules_with_shared_parameters, set_module, shared_modules
from slimmer.passes import LayerChange, LayerSkip, PassResult
from slimmer.recipe import DecomposeConfig, RankRule

logger = logging.getLogger(__name__)

# Ridge of the least-squares refit behind auto's comparison: small, so an exact form scores near 0.
COMPARISON_RIDGE = 1e-6

__all__ = ["decompose", "bottleneck_macs", "separable_macs", "conv_macs"]


def conv_params(conv: nn.Conv2d) -> int:
    return sum(parameter.numel() for parameter in conv.parameters())


def conv_macs(conv: nn.Conv2d, shape: LayerShape) -> int:
    height, width = shape.output_shape[2:]
    return height * width * conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]


def bottleneck_macs(conv: nn.Conv2d, shape: LayerShape, rank_in: int, rank_out: int) -> int:
    """MACs per sample of the bottleneck that would replace ``conv``; the reduce runs at the input resolution."""
    in_height, in_width = shape.input_shape[2:]
    out_height, out_width = shape.output_shape[2:]
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    reduce = in_height * in_width * conv.in_channels * rank_in if rank_in < conv.in_channels else 0
    core_in = rank_in if rank_in < conv.in_channels else conv.in_channels
    core_out = rank_out if rank_out < conv.out_channels else conv.out_channels
    core = out_height * out_width * core_in * core_out * kernel
    expand = out_height * out_width * rank_out * conv.out_channels if rank_out < conv.out_channels else 0
    return reduce + core + expand


def bottleneck_params(conv: nn.Conv2d, rank_in: int, rank_out: int) -> int:
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    core_in = min(rank_in, conv.in_channels)
    core_out = min(rank_out, conv.out_channels)
    reduce = conv.in_channels * rank_in if rank_in < conv.in_channels else 0
    expand = rank_out * conv.out_channels if rank_out < conv.out_channels else 0
    bias = conv.out_channels if conv.bias is not None else 0
    return reduce + core_in * core_out * kernel + expand + bias


def separable_macs(conv: nn.Conv2d, shape: LayerShape, multiplier: int) -> int:
    """MACs per sample of a depthwise (multiplier K) plus pointwise pair that would replace ``conv``."""
    out_height, out_width = shape.output_shape[2:]
    channels = conv.in_channels * multiplier
    return out_height * out_width * channels * (conv.kernel_size[0] * conv.kernel_size[1] + conv.out_channels)


def separable_params(conv: nn.Conv2d, multiplier: int) -> int:
    channels = conv.in_channels * multiplier
    bias = conv.out_channels if conv.bias is not None else 0
    return channels * (conv.kernel_size[0] * conv.kernel_size[1] + conv.out_channels) + bias


def full_multiplier(conv: nn.Conv2d) -> int:
    return min(conv.out_channels, conv.kernel_size[0] * conv.kernel_size[1])


def choose_multiplier(rule: RankRule, conv: nn.Conv2d) -> int:
    """Choose the channel multiplier K from ``rule``, in ``[1, min(O, kh*kw)]``; every input channel meets an energy rule."""
    full = full_multiplier(conv)
    if rule.fixed is not None:
        if rule.fixed > full:
            logger.warning("Channel multiplier %d reduced to %d = min(O, kh*kw), where the pair is already exact",
                           rule.fixed, full)
        return min(rule.fixed, full)
    if rule.ratio is not None:
        return min(max(math.ceil(rule.ratio * full - 1e-9), 1), full)
    assert rule.energy is not None
    spectra = channel_singular_values(conv.weight)
    return min(max(energy_rank(values, rule.energy) for values in spectra), full)


@dataclass
class Candidate:
    """One possible replacement of a layer: its form, settings, cost and how to build it."""

    form: str
    settings: dict[str, int]
    macs: int
    params: int
    build: Callable[[], nn.Module]
    error: float | None = None

    def describe(self) -> str:
        values = ", ".join(f"{key}={value}" for key, value in self.settings.items())
        return f"{self.form} ({values})"


def _spectrum(conv: nn.Conv2d, mode: int, rule: RankRule) -> torch.Tensor | None:
    """Singular values of one mode, computed only for an energy rule, the one rule that reads them."""
    return mode_singular_values(conv.weight, mode) if rule.energy is not None else None


def _bottleneck(conv: nn.Conv2d, shape: LayerShape, config: DecomposeConfig) -> Candidate:
    rule_out, rule_in = config.rule_out(), config.rule_in()
    rank_out = choose_rank(rule_out, conv.out_channels, _spectrum(conv, 0, rule_out), config.round_to)
    rank_in = choose_rank(rule_in, conv.in_channels, _spectrum(conv, 1, rule_in), config.round_to)
    return Candidate(
        "bottleneck", {"rank_in": rank_in, "rank_out": rank_out}, bottleneck_macs(conv, shape, rank_in, rank_out),
        bottleneck_params(conv, rank_in, rank_out),
        lambda: bottleneck_from_conv(conv, rank_in, rank_out, config.hooi_iterations))


def _separable(conv: nn.Conv2d, shape: LayerShape, multiplier: int) -> Candidate:
    return Candidate("separable", {"multiplier": multiplier}, separable_macs(conv, shape, multiplier),
                     separable_params(conv, multiplier), lambda: separable_from_conv(conv, multiplier))


def _separable_within(conv: nn.Conv2d, shape: LayerShape, max_macs: int) -> Candidate | None:
    """Return the separable candidate with the largest multiplier whose MACs do not exceed ``max_macs``."""
    fitting = [k for k in range(1, full_multiplier(conv) + 1) if separable_macs(conv, shape, k) <= max_macs]
    return _separable(conv, shape, max(fitting)) if fitting else None


def _skip_reason(name: str, conv: nn.Conv2d, shape: LayerShape | None, config: DecomposeConfig,
                 shared: set[int], tied: set[int]) -> str | None:
    if shape is None:
        return "not called in a forward pass on the example input"
    if shape.calls > 1 or id(conv) in shared:
        return "used in more than one place (shared weights); rewriting it would split the weights"
    if id(conv) in tied:
        return "holds a parameter that another module also holds (tied weights); rewriting it would untie them"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}); the low-rank forms apply to dense convolutions only"
    if conv.kernel_size == (1, 1):
        return "1x1 kernel; nothing to factor"
    if min(conv.in_channels, conv.out_channels) < config.min_channels:
        return (f"{conv.in_channels} -> {conv.out_channels} channels is below min_channels={config.min_channels}")
    if config.min_macs and conv_macs(conv, shape) < config.min_macs:
        return f"{conv_macs(conv, shape)} MACs is below min_macs={config.min_macs}"
    return None


def _cheaper(candidate: Candidate, macs: int, params: int) -> str | None:
    """Why ``candidate`` does not pay, or None when it lowers both MACs and parameters."""
    if candidate.macs >= macs:
        return f"{candidate.describe()} gives {candidate.macs} MACs, not fewer than {macs}"
    if candidate.params >= params:
        return f"{candidate.describe()} has {candidate.params} parameters, not fewer than {params}"
    return None


def like_original(conv: nn.Conv2d, replacement: nn.Module) -> nn.Module:
    """Give ``replacement`` the training mode of ``conv`` and its frozen state (``requires_grad``), bias apart."""
    replacement.train(conv.training)
    for name, parameter in replacement.named_parameters():
        source = conv.bias if name.endswith("bias") and conv.bias is not None else conv.weight
        parameter.requires_grad_(source.requires_grad)
    return replacement


@torch.no_grad()
def _output_error(candidate: Candidate, conv: nn.Conv2d, inputs: torch.Tensor) -> float:
    """Relative output error of the candidate after a least-squares refit of its last layer on ``inputs``."""
    module = candidate.build()
    target = conv(inputs)
    refit_last_layer(module, inputs, target, ridge=COMPARISON_RIDGE)
    return float((module(inputs) - target).norm() / (target.norm() + 1e-12))


def _choose(name: str, conv: nn.Conv2d, shape: LayerShape, config: DecomposeConfig,
            layer_inputs: dict[str, torch.Tensor]) -> tuple[Candidate | None, str]:
    """Pick the replacement for one layer; return it (or None) and the reason in words."""
    macs, params = conv_macs(conv, shape), conv_params(conv)
    if config.form == "separable":
        assert config.multiplier is not None
        candidate = _separable(conv, shape, choose_multiplier(config.multiplier, conv))
        reason = _cheaper(candidate, macs, params)
        return (None, reason) if reason else (candidate, "form separable requested")

    bottleneck = _bottleneck(conv, shape, config)
    if config.form == "bottleneck":
        reason = _cheaper(bottleneck, macs, params)
        return (None, reason) if reason else (bottleneck, "form bottleneck requested")

    budget = bottleneck.macs if bottleneck.macs < macs else macs - 1
    separable = _separable_within(conv, shape, budget)
    paying = [candidate for candidate in (bottleneck, separable)
              if candidate is not None and _cheaper(candidate, macs, params) is None]
    if not paying:
        return None, f"auto: neither form lowers MACs and parameters within {budget} MACs"
    if len(paying) == 1:
        return paying[0], f"auto: only {paying[0].form} lowers MACs and parameters within {budget} MACs"
    for candidate in paying:
        candidate.error = _output_error(candidate, conv, layer_inputs[name])
    best = min(paying, key=lambda candidate: candidate.error)
    other = next(candidate for candidate in paying if candidate is not best)
    return best, (f"auto: {best.describe()} error {best.error:.4f} at {best.macs} MACs < "
                  f"{other.describe()} error {other.error:.4f} at {other.macs} MACs")


def decompose(model: nn.Module, config: DecomposeConfig, example_input: torch.Tensor,
              inplace: bool = False, calibration_inputs: torch.Tensor | None = None) -> PassResult:
    """Replace each selected convolution by the low-rank form that ``config`` requests.

    Layers are selected by qualified-name patterns. A layer is skipped, with the reason recorded, when
    it is grouped, shared or too small, or when no replacement lowers both its MACs and parameters.
    Form ``auto`` compares output errors on ``calibration_inputs (N, C, H, W)``; without them it uses
    seeded random inputs, a weaker proxy.
    """
    if not inplace:
        model = copy.deepcopy(model)
    shapes = record_shapes(model, example_input)
    shared = shared_modules(model)
    tied = modules_with_shared_parameters(model)
    result = PassResult("decompose", model)

    candidates = [(name, conv) for name, conv in iter_convolutions(model)
                  if matches(name, config.include, config.exclude)]
    skip_reasons = {name: _skip_reason(name, conv, shapes.get(name), config, shared, tied)
                    for name, conv in candidates}
    selected = [(name, conv) for name, conv in candidates if skip_reasons[name] is None]
    for name, _ in candidates:
        if skip_reasons[name] is not None:
            result.skipped.append(LayerSkip(name, skip_reasons[name]))
    if config.target is not None:
        return _decompose_to_target(model, config, example_input, selected, shapes, calibration_inputs, result)

    layer_inputs: dict[str, torch.Tensor] = {}
    if config.form == "auto" and selected:
        if calibration_inputs is None:
            logger.warning("Form auto without calibration images compares errors on random inputs")
            generator = torch.Generator().manual_seed(0)
            calibration_inputs = torch.randn((16, *example_input.shape[1:]), generator=generator)
        layer_inputs = capture_inputs(model, [name for name, _ in selected],
                                      calibration_inputs[:config.calibration_images])

    for name, conv in selected:
        shape = shapes[name]

        chosen, reason = _choose(name, conv, shape, config, layer_inputs)
        if chosen is None:
            result.skipped.append(LayerSkip(name, reason))
            continue
        set_module(model, name, like_original(conv, chosen.build()))
        _record_change(result, name, conv, shape, chosen.form, chosen.settings, chosen.macs, chosen.params, reason,
                       chosen.error)

    result.stats = {"rewritten": len(result.changed), "skipped": len(result.skipped)}
    return result


def _record_change(result: PassResult, name: str, conv: nn.Conv2d, shape: LayerShape, form: str,
                   settings: dict[str, int], macs: int, params: int, reason: str, error: float | None) -> None:
    before = conv_macs(conv, shape)
    after = f"{form} ({', '.join(f'{key}={value}' for key, value in settings.items())})"
    result.changed.append(LayerChange(
        name,
        before=f"conv {conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]}",
        after=after,
        details={"form": form, **settings, "macs_before": before, "macs_after": macs,
                 "params_before": conv_params(conv), "params_after": params, "reason": reason,
                 **({"error": error} if error is not None else {})},
    ))
    logger.info("Decomposed %s: %d -> %d MACs as %s (%s)", name, before, macs, after, reason)


def _decompose_to_target(model: nn.Module, config: DecomposeConfig, example_input: torch.Tensor,
                         selected: list[tuple[str, nn.Conv2d]], shapes: dict[str, LayerShape],
                         calibration_inputs: torch.Tensor | None, result: PassResult) -> PassResult:
    """Plan ranks and forms to reach ``config.target``, rewrite the model and record the plan in the result."""
    from slimmer.plan import plan_decomposition, unit

    plan = plan_decomposition(model, config, example_input, selected, shapes, calibration_inputs)
    for layer in plan.layers:
        option = layer.chosen
        if option.form == "keep":
            result.skipped.append(LayerSkip(layer.name, "the plan keeps it: every cheaper option adds more error "
                                                        "per saved cost than the budget needed"))
            continue
        cost = option.cost(plan.metric)
        amount = f"{cost:.3f}" if plan.metric == "latency" else f"{cost:,.0f}"
        reason = (f"planned for {plan.metric} {plan.target_share:g}: relative output error {option.error:.4f} "
                  f"at {amount} {unit(plan.metric)}")
        _record_change(result, layer.name, layer.conv, layer.shape, option.form, option.settings, option.macs,
                       option.params, reason, option.error)
    result.stats = {"rewritten": len(result.changed), "skipped": len(result.skipped), "plan": plan.summary(),
                    "sensitivity": plan.sensitivity()}
    return result
