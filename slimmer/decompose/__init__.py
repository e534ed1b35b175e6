"""Decompose pass: replace selected k x k convolutions by low-rank forms initialized from their weights."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from slimmer.cost import LayerShape, record_shapes
from slimmer.decompose.ranks import choose_rank
from slimmer.decompose.tucker import bottleneck_from_conv, mode_singular_values
from slimmer.graph import iter_convolutions, matches, set_module, shared_modules
from slimmer.passes import LayerChange, LayerSkip, PassResult
from slimmer.recipe import DecomposeConfig

logger = logging.getLogger(__name__)

__all__ = ["decompose", "bottleneck_macs", "conv_macs"]


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


def _skip_reason(name: str, conv: nn.Conv2d, shape: LayerShape | None, config: DecomposeConfig,
                 shared: set[int]) -> str | None:
    if shape is None:
        return "not called in a forward pass on the example input"
    if shape.calls > 1 or id(conv) in shared:
        return "used in more than one place (shared weights); rewriting it would split the weights"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}); Tucker-2 applies to dense convolutions only"
    if conv.kernel_size == (1, 1):
        return "1x1 kernel; nothing to factor"
    if min(conv.in_channels, conv.out_channels) < config.min_channels:
        return (f"{conv.in_channels} -> {conv.out_channels} channels is below min_channels={config.min_channels}")
    if config.min_macs and conv_macs(conv, shape) < config.min_macs:
        return f"{conv_macs(conv, shape)} MACs is below min_macs={config.min_macs}"
    return None


def decompose(model: nn.Module, config: DecomposeConfig, example_input: torch.Tensor,
              inplace: bool = False) -> PassResult:
    """Replace each selected convolution by a Tucker-2 bottleneck of the ranks ``config`` gives.

    Layers are selected by qualified-name patterns. A layer is skipped, with the reason recorded, when
    it is grouped, shared or too small, or when no cheaper replacement exists at the chosen ranks.
    """
    if not inplace:
        model = copy.deepcopy(model)
    shapes = record_shapes(model, example_input)
    shared = shared_modules(model)
    result = PassResult("decompose", model)

    candidates = [(name, conv) for name, conv in iter_convolutions(model)
                  if matches(name, config.include, config.exclude)]
    for name, conv in candidates:
        shape = shapes.get(name)
        reason = _skip_reason(name, conv, shape, config, shared)
        if reason is not None:
            result.skipped.append(LayerSkip(name, reason))
            continue
        assert shape is not None

        rank_out = choose_rank(config.rule_out(), conv.out_channels, mode_singular_values(conv.weight, 0), config.round_to)
        rank_in = choose_rank(config.rule_in(), conv.in_channels, mode_singular_values(conv.weight, 1), config.round_to)
        before = conv_macs(conv, shape)
        after = bottleneck_macs(conv, shape, rank_in, rank_out)
        if after >= before:
            result.skipped.append(LayerSkip(
                name, f"ranks (in={rank_in}, out={rank_out}) give {after} MACs, not fewer than {before}"))
            continue

        bottleneck = bottleneck_from_conv(conv, rank_in, rank_out, config.hooi_iterations)
        set_module(model, name, bottleneck)
        result.changed.append(LayerChange(
            name,
            before=f"conv {conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]}",
            after=f"bottleneck ranks in={bottleneck.rank_in} out={bottleneck.rank_out}",
            details={"rank_in": bottleneck.rank_in, "rank_out": bottleneck.rank_out,
                     "macs_before": before, "macs_after": after},
        ))
        logger.info("Decomposed %s: %d -> %d MACs (ranks in=%d, out=%d)", name, before, after,
                    bottleneck.rank_in, bottleneck.rank_out)

    result.stats = {"rewritten": len(result.changed), "skipped": len(result.skipped)}
    return result
