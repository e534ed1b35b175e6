"""Refit pass: least-squares refit of each replacement on calibration activations.

Let ``Y`` be a replaced layer's output in the original network and ``Z`` the features that feed
the fitted layers in the compressed network. A layer's weight becomes the ridge solution
``W = Yᵀ Z (Zᵀ Z + λ I)⁻¹`` over all output positions, with ``λ = ridge * trace(Zᵀ Z) / dim``.
For a bottleneck, ``Z`` contains the unfolded patches after its reduce and the solution is cut to
rank ``r_out`` (reduced-rank regression), which gives the core and the expand together; for a
separable pair, ``Z`` is the depthwise output and only the pointwise layer is refit.
Layers are refit in execution order, each on the inputs that the already-refit network
produces, so errors do not pile up. Optionally the batch-norm statistics are then recomputed on
the same images.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from slimmer.decompose.datafit import refit_bottleneck, unfold_patches
from slimmer.graph import get_module, run_with_hooks
from slimmer.layers import SeparableConv, TuckerBottleneck
from slimmer.passes import LayerChange, PassResult
from slimmer.recipe import RefitConfig

REFIT_TYPES = (TuckerBottleneck, SeparableConv)

logger = logging.getLogger(__name__)


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
            design = unfold_patches(features, last)
    else:
        raise TypeError(f"refit applies to slimmer's replacement modules, found {type(module).__name__}")
    weight, bias = ridge_solve(design, _rows(target), ridge, last.bias is not None)
    last.weight.copy_(weight.reshape(last.weight.shape).to(last.weight.dtype))
    if bias is not None:
        last.bias.copy_(bias.to(last.bias.dtype))


@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], inputs: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Collect the input of each named module on ``inputs`` in one pass over the model."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:
        def hook(_module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            captured[name].append(args[0].detach())
        handles.append(get_module(model, name).register_forward_pre_hook(hook))
    run_with_hooks(model, handles, inputs, batch_size)
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


@torch.no_grad()
def capture_outputs(model: nn.Module, names: list[str], inputs: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Collect the output of each named module on ``inputs`` in one pass over the model."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any, name: str = name) -> None:
            captured[name].append(output.detach())
        handles.append(get_module(model, name).register_forward_hook(hook))
    run_with_hooks(model, handles, inputs, batch_size)
    return {name: torch.cat(tensors) for name, tensors in captured.items()}


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output - target).norm() / (target.norm() + 1e-12))


def refit(model: nn.Module, original: nn.Module, config: RefitConfig, calibration_inputs: torch.Tensor,
          inplace: bool = False) -> PassResult:
    """Refit every replacement in ``model`` to match ``original`` on ``calibration_inputs (N, C, H, W)``.

    The targets come from one pass over the original model. Then one pass over ``model`` with all
    calibration images as a single batch refits each replacement when the forward pass reaches it,
    so every layer is fit on the inputs that the already-refit layers before it produce. A
    bottleneck's core and expand are refit jointly (reduced-rank regression, the reduce stays); a
    separable pair's pointwise layer is refit alone.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    original.eval()
    result = PassResult("refit", model)
    order = _execution_order(model, calibration_inputs)
    # NOTE: the targets of all replaced layers and one batch of every activation stay in memory at
    # once. That suits CIFAR-sized inputs, but at 224x224 a few hundred images take gigabytes.
    targets = capture_outputs(original, order, calibration_inputs, config.batch_size)
    errors: dict[str, tuple[float, float]] = {}

    def refit_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, name: str) -> torch.Tensor:
        layer_input, target = args[0], targets[name]
        before = _relative_error(output, target)
        if isinstance(module, TuckerBottleneck):
            refit_bottleneck(module, layer_input, target, config.ridge)
        else:
            refit_last_layer(module, layer_input, target, config.ridge)
        output = module.forward(layer_input)  # forward() skips this hook
        errors[name] = (before, _relative_error(output, target))
        return output

    handles = [get_module(model, name).register_forward_hook(
        lambda module, args, output, name=name: refit_hook(module, args, output, name)) for name in order]
    try:
        with torch.no_grad():
            model(calibration_inputs)
    finally:
        for handle in handles:
            handle.remove()

    for name in order:
        before, after = errors[name]
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
