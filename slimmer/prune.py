"""Prune pass: remove 1x1-convolution channels through torch-pruning's dependency graph.

Each pruning group (the channels of one layer and everything coupled to them) is checked before
it is kept: the pruned model must compute the same output as the unpruned model with those
channels zeroed ("masked"). torch-pruning does not model every operation, such as a shortcut that
zero-pads channels with ``F.pad``. A group that passes through such an operation fails the check,
is rolled back and is reported as skipped. A final forward pass checks the output shapes.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from slimmer.cost import output_tensors
from slimmer.errors import CheckFailedError
from slimmer.graph import get_module, matches
from slimmer.layers import TuckerBottleneck
from slimmer.passes import LayerChange, LayerSkip, PassResult
from slimmer.recipe import PruneConfig

logger = logging.getLogger(__name__)

MASK_TOLERANCE = 1e-4


@torch.no_grad()
def _forward(model: nn.Module, example_input: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    return output_tensors(model(example_input))


def _targets(model: nn.Module, config: PruneConfig) -> list[tuple[str, str]]:
    """List ``(group root, owner)`` pairs: the conv whose output channels are pruned, and the layer reported."""
    targets: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, TuckerBottleneck) and matches(name, config.include, config.exclude):
            if hasattr(module, "reduce"):
                targets.append((f"{name}.reduce", name))
            if hasattr(module, "expand"):
                targets.append((f"{name}.core", name))
    if config.targets == "all_1x1":
        roots = {root for root, _ in targets}
        for name, module in model.named_modules():
            if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
                    and name not in roots and matches(name, config.include, config.exclude)):
                targets.append((name, name))
    return targets


def _keep_count(channels: int, ratio: float, round_to: int) -> int:
    remaining = channels * (1.0 - ratio)
    steps = max(int(remaining / round_to + 0.5), 1)
    return min(steps * round_to, channels)


@torch.no_grad()
def _masked_output(model: nn.Module, group: Any, example_input: torch.Tensor) -> list[torch.Tensor]:
    """Run ``model`` with the group's pruned channels zeroed at every layer that produces them."""
    saved: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []
    for dependency, indices in group:
        layer = dependency.target.module
        if not group._DG.is_out_channel_pruning_fn(dependency.handler):
            continue
        if not isinstance(layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            continue
        for parameter in (layer.weight, getattr(layer, "bias", None)):
            if parameter is not None:
                saved.append((parameter, list(indices), parameter.data[indices].clone()))
                parameter.data[indices] = 0
    try:
        return _forward(model, example_input)
    finally:
        for parameter, indices, values in reversed(saved):
            parameter.data[indices] = values


def _same(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> bool:
    if len(reference) != len(candidate):
        return False
    for expected, found in zip(reference, candidate):
        if expected.shape != found.shape or not torch.isfinite(found).all():
            return False
        scale = expected.abs().max().item() + 1e-12
        if (expected - found).abs().max().item() > MASK_TOLERANCE * scale:
            return False
    return True


def _importance(config: PruneConfig) -> tp.importance.Importance:
    return tp.importance.GroupMagnitudeImportance(p=1 if config.importance == "l1" else 2,
                                                  group_reduction="mean", normalizer=None)


def prune(model: nn.Module, config: PruneConfig, example_input: torch.Tensor, inplace: bool = False) -> PassResult:
    """Prune a ``config.ratio`` share of the channels of each selected 1x1 group, lowest importance first.

    Channel counts kept are multiples of ``config.round_to`` and never 0. The returned model is
    checked by a forward pass: output shapes must equal the input model's.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    reference_shapes = [tensor.shape for tensor in _forward(model, example_input)]
    importance = _importance(config)
    result = PassResult("prune", model)

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    for root_name, owner in _targets(model, config):
        root = get_module(model, root_name)
        channels = root.out_channels
        keep = _keep_count(channels, config.ratio, config.round_to)
        if keep >= channels:
            result.skipped.append(LayerSkip(root_name, f"ratio {config.ratio} with round_to={config.round_to} "
                                                       f"keeps all {channels} channels"))
            continue

        try:
            group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=list(range(channels)))
            scores = importance(group)
            if scores is None:
                result.skipped.append(LayerSkip(root_name, "torch-pruning found no weights to score in its group"))
                continue
            pruned_indices = sorted(torch.argsort(scores)[: channels - keep].tolist())
            group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=pruned_indices)
        except (RuntimeError, ValueError, IndexError) as error:
            result.skipped.append(LayerSkip(
                root_name, f"torch-pruning cannot map its channel group ({type(error).__name__}: {error})"))
            logger.warning("Kept %s out of pruning: torch-pruning failed on its group: %s", root_name, error)
            continue
        if not graph.check_pruning_group(group):
            result.skipped.append(LayerSkip(root_name, "pruning would leave a coupled layer with 0 channels"))
            continue

        expected = _masked_output(model, group, example_input)
        snapshot = copy.deepcopy(model)
        # torch-pruning's own nodes for functional operations (add, pad, reshape) have no module name.
        coupled = sorted({graph._module2name[dep.target.module] for dep, _ in group
                          if dep.target.module in graph._module2name})
        try:
            group.prune()
            found = _forward(model, example_input)
            safe = _same(expected, found)
        except (RuntimeError, ValueError, IndexError) as error:
            logger.debug("Pruning group of %s failed: %s", root_name, error)
            safe = False
        if not safe:
            model = snapshot
            result.model = model
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
            result.skipped.append(LayerSkip(
                root_name, "its channel group passes through an operation torch-pruning does not model "
                           f"(the pruned model did not match the masked one); coupled layers: {', '.join(coupled)}"))
            logger.warning("Kept %s out of pruning: the pruned model did not match the masked model", root_name)
            continue

        result.changed.append(LayerChange(
            owner, before=f"{root_name}: {channels} channels", after=f"{keep} channels",
            details={"root": root_name, "channels_before": channels, "channels_after": keep, "coupled": coupled},
        ))
        logger.info("Pruned %s: %d -> %d channels", root_name, channels, keep)

    final_shapes = [tensor.shape for tensor in _forward(model, example_input)]
    if final_shapes != reference_shapes:
        raise CheckFailedError(f"pruning changed the output shapes from {reference_shapes} to {final_shapes}")
    result.stats = {"groups_pruned": len(result.changed), "groups_skipped": len(result.skipped)}
    return result
