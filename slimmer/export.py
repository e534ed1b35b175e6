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

from slimmer.cost import named_output_tensors
from slimmer.errors import CheckFailedError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"


def _output_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Name the ONNX outputs after the tensors in the model output (``output``, or ``output_0``, ``output_out``...)."""
    with torch.no_grad():
        output = model(example_input)
    return [name for name, _ in named_output_tensors(output)]


def _log_tracer_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Log each place where the tracer turned a value computed from the example input into a constant.

    Such a place is usually Python control flow on tensor data. The exported graph then takes the
    branch the example input took, for every input.
    """
    places = {}
    for warning in caught:
        if issubclass(warning.category, torch.jit.TracerWarning):
            places.setdefault(f"{warning.filename}:{warning.lineno}", str(warning.message).split(". ")[0])
    for place, message in places.items():
        logger.warning("ONNX export fixed a value computed from the example input at %s (%s); the graph "
                       "may be right only for inputs that take the same branches", place, message)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Export ``model`` (eval mode) to ``path`` with input ``(batch, ...)``, then run ``onnx.checker``."""
    path = Path(path)
    model = model.eval()
    names = _output_names(model, example_input)
    buffer = io.BytesIO()
    # NOTE: the TorchScript-based exporter (dynamo=False) is used because it handles the models here
    # without extra dependencies and writes the same bytes for the same weights; PyTorch deprecates it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model, (example_input,), buffer, input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in names}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    _log_tracer_warnings(caught)
    proto = onnx.load_model_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(buffer.getvalue())
    logger.info("Exported %s (%d bytes, opset %d)", path, path.stat().st_size, opset)
    return path


def _check_output_layout(expected: list[tuple[str, np.ndarray]], found: list[np.ndarray]) -> None:
    """Raise CheckFailedError unless onnxruntime returned as many outputs as PyTorch, each of the same shape."""
    if len(found) != len(expected):
        raise CheckFailedError(f"onnxruntime returned {len(found)} outputs and PyTorch {len(expected)} "
                               f"({', '.join(name for name, _ in expected)}); the export is not trustworthy")
    for (name, reference), candidate in zip(expected, found):
        if reference.shape != candidate.shape:
            raise CheckFailedError(f"output {name} has shape {list(candidate.shape)} in onnxruntime and "
                                   f"{list(reference.shape)} in PyTorch; the export is not trustworthy")


UNREACHED_PATH_HINT = ("the likely cause is a layer on a path the example input did not reach, such as a branch "
                      "of data-dependent control flow, that a step changed to fit only the path taken; exclude "
                      "those layers from the steps (exclude patterns) or drop the prune step")


def compressed_model_failure(what: str, error: BaseException) -> CheckFailedError:
    """Build the one-line error for a compressed model (PyTorch or ONNX) that fails on inputs other than the example."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckFailedError(f"{what} fails on the parity or validation inputs ({type(error).__name__}: {detail}); "
                            f"{UNREACHED_PATH_HINT}; no artifacts were written")


def check_parity(onnx_path: str | Path, model: nn.Module, inputs: torch.Tensor, atol: float, rtol: float,
                 batch_size: int = 32) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch on ``inputs (N, ...)``; raise CheckFailedError past the tolerance.

    Passes when every element of every output tensor satisfies ``|onnx - torch| <= atol + rtol * |torch|``.
    Outputs are matched in the order of :func:`slimmer.cost.named_output_tensors`, and a different
    number of outputs or a different shape raises CheckFailedError too, and so does an error of
    either model on ``inputs``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval()
    max_abs = 0.0
    max_rel = 0.0
    worst_excess = 0.0
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        try:
            with torch.no_grad():
                output = model(batch)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise compressed_model_failure("the compressed PyTorch model", error) from error
        expected = [(name, tensor.detach().cpu().numpy()) for name, tensor in named_output_tensors(output)]
        try:
            found = session.run(None, {INPUT_NAME: batch.numpy()})
        # onnxruntime raises its own exception types (Fail, InvalidArgument, RuntimeException), none of
        # which derives from a common public base other than Exception.
        except Exception as error:  # noqa: BLE001
            raise compressed_model_failure("the exported ONNX model", error) from error
        _check_output_layout(expected, found)
        for (_, reference), candidate in zip(expected, found):
            difference = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
            max_abs = max(max_abs, float(difference.max()))
            max_rel = max(max_rel, float((difference / (np.abs(reference) + 1e-12)).max()))
            worst_excess = max(worst_excess, float((difference - (atol + rtol * np.abs(reference))).max()))
    parity = {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "atol": atol, "rtol": rtol,
              "samples": int(len(inputs)), "outputs": len(found), "passed": worst_excess <= 0.0}
    logger.info("ONNX parity on %d inputs: max abs %.3g, max rel %.3g", len(inputs), max_abs, max_rel)
    if not parity["passed"]:
        raise CheckFailedError(
            f"ONNX output differs from PyTorch beyond tolerance (max abs {max_abs:.3g}, max rel {max_rel:.3g}; "
            f"atol={atol}, rtol={rtol}); the export is not trustworthy, so no artifacts were written"
        )
    return parity
