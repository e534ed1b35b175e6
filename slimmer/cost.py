"""Counting parameters and MACs, and measuring onnxruntime latency.

One MAC is one multiply-add. Counted layers: convolutions, ``out_elements * in_channels / groups * kh * kw``
(plus nothing for the bias), and linear layers, ``in_features * out_features`` per row. Normalization,
activations, pooling and additions are not counted. Figures are per sample (batch size 1).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

COUNTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerShape:
    """Input and output shapes one module saw in a forward pass (first call only)."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    calls: int = 1


def count_params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def layer_macs(module: nn.Module, output_shape: tuple[int, ...]) -> int:
    """Count the MACs of one conv or linear layer for one sample, given its output shape ``(1, C, ...)``."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        out_elements = int(np.prod(output_shape[1:]))
        kernel = int(np.prod(module.kernel_size))
        return out_elements * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        rows = int(np.prod(output_shape[1:-1])) if len(output_shape) > 2 else 1
        return rows * module.in_features * module.out_features
    return 0


def output_tensors(value: Any) -> list[torch.Tensor]:
    """List the tensors in a model output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in output_tensors(item)]
    return []


def named_output_tensors(value: Any) -> list[tuple[str, torch.Tensor]]:
    """Pair each tensor of :func:`output_tensors` with a name, the path of tuple indexes and dict keys to it.

    A lone tensor is named ``output``. The tensors of ``(a, {"aux": b})`` are ``output_0`` and
    ``output_1_aux``. ONNX export uses these as output names.
    """
    named = _named_tensors(value, "output")
    if len(named) == 1:
        return [("output", named[0][1])]
    return named


def _named_tensors(value: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        items = [(str(key), item) for key, item in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(str(index), item) for index, item in enumerate(value)]
    else:
        return []
    return [pair for key, item in items for pair in _named_tensors(item, f"{prefix}_{key}")]


def output_shapes(value: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Return ``(name, shape)`` for every tensor in a model output, named as :func:`named_output_tensors` does."""
    return [(name, tuple(tensor.shape)) for name, tensor in named_output_tensors(value)]


@torch.no_grad()
def record_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, LayerShape]:
    """Run one forward pass and return, per qualified module name, the shapes it saw."""
    shapes: dict[str, LayerShape] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if name in shapes:
                shapes[name].calls += 1
                return
            tensors_in, tensors_out = output_tensors(inputs), output_tensors(output)
            if tensors_in and tensors_out:
                shapes[name] = LayerShape(tuple(tensors_in[0].shape), tuple(tensors_out[0].shape))
        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return shapes


def count_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Count total MACs for one sample and MACs per counted layer (a layer called twice counts twice)."""
    shapes = record_shapes(model, example_input)
    per_layer: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, COUNTED_LAYERS) and name in shapes:
            per_layer[name] = layer_macs(module, shapes[name].output_shape) * shapes[name].calls
    return sum(per_layer.values()), per_layer


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure_latency(
    onnx_paths: dict[str, Path],
    input_shape: list[int],
    batch_sizes: list[int],
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    seed: int = 0,
) -> dict[str, dict[int, dict[str, float]]]:
    """Time onnxruntime CPU inference of each model; returns ``{label: {batch: {median, p90}}}`` in ms.

    The models are run interleaved (one run of each in turn) so that machine noise hits all alike.
    """
    sessions = {label: _session(path, threads) for label, path in onnx_paths.items()}
    generator = np.random.default_rng(seed)
    results: dict[str, dict[int, dict[str, float]]] = {label: {} for label in onnx_paths}
    for batch in batch_sizes:
        feed = generator.standard_normal((batch, *input_shape)).astype(np.float32)
        timings: dict[str, list[float]] = {label: [] for label in sessions}
        for session in sessions.values():
            name = session.get_inputs()[0].name
            for _ in range(warmup):
                session.run(None, {name: feed})
        for _ in range(runs):
            for label, session in sessions.items():
                name = session.get_inputs()[0].name
                start = time.perf_counter()
                session.run(None, {name: feed})
                timings[label].append((time.perf_counter() - start) * 1000.0)
        for label, values in timings.items():
            results[label][batch] = {"median": _percentile(values, 50), "p90": _percentile(values, 90)}
            logger.info("Latency %s batch %d: median %.3f ms, p90 %.3f ms", label, batch,
                        results[label][batch]["median"], results[label][batch]["p90"])
    return results
