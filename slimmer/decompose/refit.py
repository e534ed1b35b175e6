"""Refit pass: least-squares refit of each replacement's last layer on calibration activations.

Let ``Y`` be a replaced layer's output in the original network and ``Z`` the features that feed
the replacement's last layer in the compressed network. The last layer's weight becomes the ridge
solution ``W = Yᵀ Z (Zᵀ Z + λ I)⁻¹`` over all output positions, with
``λ = ridge * trace(Zᵀ Z) / dim``. The last layer is a bottleneck's 1x1 expand (or its k x k core,
over unfolded patches, when it has no expand) or a separable pair's pointwise convolution.
Layers are refit in execution order, each on the inputs that the already-refit network
produces, so errors do not pile up. Optionally the batch-norm statistics are then recomputed on
the same images.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimmer.graph import get_module
from slimmer.layers import SeparableConv, TuckerBottleneck

REFIT_TYPES = (TuckerBottleneck, SeparableConv)
from slimmer.passes import LayerChange, PassResult
from slimmer.recipe import RefitConfig

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


def _execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, REFIT_TYPES):
            handles.append(module.register_forward_pre_hook(
                lambda _module, _inputs, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def _capture(model: nn.Module, name: str, inputs: torch.Tensor, batch_size: int, want: str) -> torch.Tensor:
    """Collect the input (``want='input'``) or output of module ``name`` for every calibration image."""
    module = get_module(model, name)
    # NOTE: the activations of all calibration images are held in memory at once, which suits
    # CIFAR-sized inputs. At 224x224 a few hundred images can take gigabytes for early layers.
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], output: Any = None) -> None:
        captured.append((args[0] if want == "input" else output).detach())
        raise _StopForward

    handle = (module.register_forward_pre_hook(hook) if want == "input"
              else module.register_forward_hook(hook))
    try:
        for start in range(0, len(inputs), batch_size):
            try:
                model(inputs[start:start + batch_size])
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


def _patches(features: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows of unfolded ``conv`` receptive fields: ``(N * positions, C_in * kh * kw)``."""
    padding = conv.padding
    if isinstance(padding, str):
        raise ValueError(f"refit of a core with padding={padding!r} is not supported; use numeric padding")
    if conv.padding_mode != "zeros":
        pad = (padding[1], padding[1], padding[0], padding[0])
        features = F.pad(features, pad, mode=conv.padding_mode)
        padding = (0, 0)
    columns = F.unfold(features, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1])


def ridge_solve(features: torch.Tensor, targets: torch.Tensor, ridge: float, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Solve ``min ||features @ Wᵀ + b - targets||² + λ||W||²`` in float64; return ``(W, b)``."""
    features = features.double()
    targets = targets.double()
    if with_bias:
        features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    gram = features.T @ features
    dimension = gram.shape[0]
    penalty = ridge * torch.trace(gram) / dimension + 1e-12
    regularizer = penalty * torch.eye(dimension, dtype=gram.dtype)
    if with_bias:
        regularizer[-1, -1] = 0.0
    solution = torch.linalg.solve(gram + regularizer, features.T @ targets).T
    if with_bias:
        return solution[:, :-1], solution[:, -1]
    return solution, None


@torch.no_grad()
def refit_last_layer(module: nn.Module, layer_input: torch.Tensor, target: torch.Tensor, ridge: float) -> None:
    """Refit the last layer of a bottleneck or separable pair so ``module(layer_input)`` matches ``target``."""
    if isinstance(module, SeparableConv):
        features = module.depthwise(torch.cat([layer_input] * module.multiplier, dim=1))
        last = module.pointwise
        design = _rows(features)
    elif isinstance(module, TuckerBottleneck):
        features = module.reduce(layer_input) if hasattr(module, "reduce") else layer_input
        if hasattr(module, "expand"):
            last = module.expand
            design = _rows(module.core(features))
        else:
            last = module.core
            design = _patches(features, last)
    else:
        raise TypeError(f"refit applies to slimmer's replacement modules, found {type(module).__name__}")
    weight, bias = ridge_solve(design, _rows(target), ridge, last.bias is not None)
    last.weight.copy_(weight.reshape(last.weight.shape).to(last.weight.dtype))
    if bias is not None:
        last.bias.copy_(bias.to(last.bias.dtype))


@torch.no_grad()
def _refit_one(module: nn.Module, layer_input: torch.Tensor, target: torch.Tensor, ridge: float) -> float:
    """Refit the last layer of ``module``; return the relative output error after the refit."""
    refit_last_layer(module, layer_input, target, ridge)
    output = module(layer_input)
    return float((output - target).norm() / (target.norm() + 1e-12))


@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], inputs: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Collect the input of each named module on ``inputs`` in one pass over the model."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:
        def hook(_module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            captured[name].append(args[0].detach())
        handles.append(get_module(model, name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(tensors) for name, tensors in captured.items()}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> int:
    """Recompute every batch-norm layer's running mean and variance on ``inputs``; return how many."""
    layers = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    saved = {layer: layer.momentum for layer in layers}
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start:start + batch_size])
    finally:
        for layer, momentum in saved.items():
            layer.momentum = momentum
        model.eval()
    return len(layers)


def refit(model: nn.Module, original: nn.Module, config: RefitConfig, calibration_inputs: torch.Tensor,
          inplace: bool = False) -> PassResult:
    """Refit every bottleneck of ``model`` to match ``original`` on ``calibration_inputs (N, C, H, W)``."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    original.eval()
    result = PassResult("refit", model)
    order = _execution_order(model, calibration_inputs)
    for name in order:
        bottleneck = get_module(model, name)
        target = _capture(original, name, calibration_inputs, config.batch_size, want="output")
        layer_input = _capture(model, name, calibration_inputs, config.batch_size, want="input")
        with torch.no_grad():
            before = float((bottleneck(layer_input) - target).norm() / (target.norm() + 1e-12))
        after = _refit_one(bottleneck, layer_input, target, config.ridge)
        if after > before:
            logger.warning("Refit of %s raised its relative error from %.4f to %.4f", name, before, after)
        result.changed.append(LayerChange(name, before=f"relative error {before:.4f}", after=f"relative error {after:.4f}",
                                          details={"error_before": before, "error_after": after}))
        logger.info("Refit %s: relative output error %.4f -> %.4f", name, before, after)
    if config.recalibrate_bn:
        count = recalibrate_batchnorm(model, calibration_inputs, config.batch_size)
        result.stats["batchnorm_recalibrated"] = count
    result.stats["layers_refit"] = len(order)
    return result
