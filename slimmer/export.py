"""ONNX export with a dynamic batch axis, ``onnx.checker``, and onnxruntime-versus-PyTorch parity."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from slimmer.cost import output_tensors
from slimmer.errors import CheckFailedError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"


def _output_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    with torch.no_grad():
        output = model(example_input)
    count = len(output) if isinstance(output, (tuple, list, dict)) else 1
    return ["output"] if count == 1 else [f"output_{index}" for index in range(count)]


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Export ``model`` (eval mode) to ``path`` with input ``(batch, ...)``, then run ``onnx.checker``."""
    path = Path(path)
    model = model.eval()
    names = _output_names(model, example_input)
    buffer = io.BytesIO()
    # NOTE: the TorchScript-based exporter (dynamo=False) is used because it handles the models here
    # without extra dependencies and writes the same bytes for the same weights; PyTorch deprecates it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example_input,), buffer, input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in names}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load_model_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(buffer.getvalue())
    logger.info("Exported %s (%d bytes, opset %d)", path, path.stat().st_size, opset)
    return path


def check_parity(onnx_path: str | Path, model: nn.Module, inputs: torch.Tensor, atol: float, rtol: float,
                 batch_size: int = 32) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch on ``inputs (N, ...)``; raise CheckFailedError past the tolerance.

    Passes when every element satisfies ``|onnx - torch| <= atol + rtol * |torch|``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval()
    max_abs = 0.0
    max_rel = 0.0
    worst_excess = 0.0
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        with torch.no_grad():
            expected = [tensor.detach().cpu().numpy() for tensor in output_tensors(model(batch))]
        found = session.run(None, {INPUT_NAME: batch.numpy()})
        for reference, candidate in zip(expected, found):
            difference = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
            max_abs = max(max_abs, float(difference.max()))
            max_rel = max(max_rel, float((difference / (np.abs(reference) + 1e-12)).max()))
            worst_excess = max(worst_excess, float((difference - (atol + rtol * np.abs(reference))).max()))
    parity = {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "atol": atol, "rtol": rtol,
              "samples": int(len(inputs)), "passed": worst_excess <= 0.0}
    logger.info("ONNX parity on %d inputs: max abs %.3g, max rel %.3g", len(inputs), max_abs, max_rel)
    if not parity["passed"]:
        raise CheckFailedError(
            f"ONNX output differs from PyTorch beyond tolerance (max abs {max_abs:.3g}, max rel {max_rel:.3g}; "
            f"atol={atol}, rtol={rtol}); the export is not trustworthy, so no artifacts were written"
        )
    return parity
