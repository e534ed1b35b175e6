"""Finding layers by qualified name, replacing modules in place of others, and running a model with hooks."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimmer.layers import SeparableConv, TuckerBottleneck

REWRITTEN_TYPES = (TuckerBottleneck, SeparableConv)

# Side of the square example image used when a recipe gives no model.input_shape.
DEFAULT_IMAGE_SIZE = 224


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` (for example ``layer1.0.conv1``)."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def matches(name: str, include: list[str], exclude: list[str]) -> bool:
    """Glob match on the qualified name: selected by any include pattern and by no exclude pattern."""
    included = any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
    return included and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def iter_convolutions(model: nn.Module, skip_rewritten: bool = True) -> Iterator[tuple[str, nn.Conv2d]]:
    """Yield ``(qualified name, conv)`` for every nn.Conv2d, leaving out those inside slimmer's own modules."""
    rewritten: list[str] = []
    for name, module in model.named_modules():
        if skip_rewritten and isinstance(module, REWRITTEN_TYPES):
            rewritten.append(name + ".")
            continue
        if any(name.startswith(prefix) for prefix in rewritten):
            continue
        if isinstance(module, nn.Conv2d):
            yield name, module


def shared_modules(model: nn.Module) -> set[int]:
    """Ids of modules reachable under more than one qualified name (weights shared between places)."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def modules_with_shared_parameters(model: nn.Module) -> set[int]:
    """Ids of distinct modules that hold the same parameter (tied weights)."""
    holders: dict[int, set[int]] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            holders.setdefault(id(parameter), set()).add(id(module))
    return {module for group in holders.values() if len(group) > 1 for module in group}


def default_input_shape(model: nn.Module) -> list[int]:
    """Return ``[C, 224, 224]``, C being the input channels of the model's first nn.Conv2d (3 when it has none)."""
    first = next((module for module in model.modules() if isinstance(module, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    return [channels, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE]


@torch.no_grad()
def run_with_hooks(model: nn.Module, handles: list[Any], inputs: torch.Tensor, batch_size: int) -> None:
    """Run ``inputs`` through ``model`` in eval mode, batch by batch, then remove the hook ``handles``.

    The model's training mode is restored afterwards, also when the forward pass raises.
    """
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
