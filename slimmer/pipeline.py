"""apply(): runs a recipe's steps in order, then exports, verifies and measures.

This is the only module that defines the order of the stages.
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from slimmer.cost import count_macs, count_params, measure_latency, output_shapes
from slimmer.data import build_dataset, evaluate_top1, make_loader, sample_inputs
from slimmer.decompose import decompose
from slimmer.decompose.refit import refit
from slimmer.errors import CheckFailedError, InputError
from slimmer.export import check_parity, export_onnx
from slimmer.finetune import finetune
from slimmer.graph import default_input_shape
from slimmer.layers import REPLACEMENT_FORMS
from slimmer.model_io import save_compressed
from slimmer.passes import PassResult
from slimmer.prune import prune
from slimmer.recipe import DecomposeStep, FinetuneStep, PruneStep, Recipe, RefitStep, load_recipe, recipe_from_dict
from slimmer.report import environment, layer_table, summary_ratios, write_report

logger = logging.getLogger(__name__)


@dataclass
class Datasets:
    train: Any = None
    val: Any = None
    calibration: Any = None


@dataclass
class RunContext:
    recipe: Recipe
    example_input: torch.Tensor
    datasets: Datasets
    progress: bool = True
    timings_s: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def as_recipe(recipe: Recipe | dict[str, Any] | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def search_path(recipe: Recipe) -> list[Path]:
    return [recipe.resolve_path(folder) for folder in recipe.model.python_path]


def load_datasets(recipe: Recipe) -> Datasets:
    """Build the datasets the recipe names; fine-tuning requires ``data.train``."""
    folders = search_path(recipe)
    datasets = Datasets()
    if recipe.data.train is not None:
        datasets.train = build_dataset(recipe.data.train, recipe.resolve_path, folders, recipe.seed, "data.train")
    if recipe.data.val is not None:
        datasets.val = build_dataset(recipe.data.val, recipe.resolve_path, folders, recipe.seed, "data.val")
    if recipe.data.calibration is not None:
        datasets.calibration = build_dataset(recipe.data.calibration, recipe.resolve_path, folders, recipe.seed,
                                             "data.calibration")
    if any(isinstance(step, FinetuneStep) for step in recipe.steps) and datasets.train is None:
        raise InputError("the recipe has a finetune step but no data.train; add data.train or remove the step")
    if (any(isinstance(step, RefitStep) for step in recipe.steps) and datasets.train is None
            and datasets.calibration is None):
        raise InputError("the recipe has a refit step but no data.calibration or data.train; add one of them")
    return datasets


def calibration_images(context: RunContext, count: int) -> torch.Tensor | None:
    """``count`` images from data.calibration, else data.train, else data.val; None without data."""
    datasets = context.datasets
    for source in (datasets.calibration, datasets.train, datasets.val):
        if source is not None:
            return sample_inputs(source, count, context.recipe.model.input_shape, context.recipe.seed)
    return None


def run_steps(model: nn.Module, teacher: nn.Module, context: RunContext) -> tuple[nn.Module, list[PassResult]]:
    """Run the recipe's steps in order on a copy of ``model``; ``teacher`` is the original for distillation."""
    results: list[PassResult] = []
    model = copy.deepcopy(model)
    for index, step in enumerate(context.recipe.steps):
        started = time.perf_counter()
        if isinstance(step, DecomposeStep):
            images = None
            if step.decompose.form == "auto":
                images = calibration_images(context, step.decompose.calibration_images)
            result = decompose(model, step.decompose, context.example_input, inplace=True, calibration_inputs=images)
        elif isinstance(step, RefitStep):
            images = calibration_images(context, step.refit.images)
            result = refit(model, teacher, step.refit, images, inplace=True)
        elif isinstance(step, PruneStep):
            result = prune(model, step.prune, context.example_input, inplace=True)
        elif isinstance(step, FinetuneStep):
            config = step.finetune
            loader = make_loader(context.datasets.train, context.recipe.data, batch_size=config.batch_size,
                                 shuffle=True, seed=context.recipe.seed + index)
            result = finetune(model, config, loader, teacher if config.distill else None, inplace=True,
                              progress=context.progress)
        else:
            raise TypeError(f"unknown step type {type(step).__name__}")
        model = result.model
        results.append(result)
        context.timings_s[f"steps[{index}].{result.pass_name}"] = time.perf_counter() - started
        logger.info("Step %d (%s): %d layers changed, %d skipped", index, result.pass_name,
                    len(result.changed), len(result.skipped))
    return model.eval(), results


def with_input_shape(recipe: Recipe, model: nn.Module) -> Recipe:
    """Return ``recipe``, or a copy with ``model.input_shape`` taken from the model when the recipe leaves it out."""
    if "input_shape" in recipe.model.model_fields_set:
        return recipe
    recipe = recipe.model_copy(deep=True)
    recipe.model.input_shape = default_input_shape(model)
    logger.info("model.input_shape not given; using %s (the first convolution's input channels)",
                recipe.model.input_shape)
    return recipe


def check_example_input(model: nn.Module, example_input: torch.Tensor) -> None:
    """Run ``model`` once on ``example_input (1, ...)``; raise InputError naming model.input_shape if that fails."""
    try:
        with torch.no_grad():
            model(example_input)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise InputError(f"the model's forward pass failed on an example input of shape {list(example_input.shape)}: "
                         f"{error}; check model.input_shape ({list(example_input.shape[1:])}), the shape of one "
                         "input without the batch axis") from None


def recipe_architecture(recipe: Recipe) -> dict[str, Any] | None:
    """Return the recipe's model class as :func:`slimmer.model_io.save_compressed` records it, or None."""
    if recipe.model.architecture is None:
        return None
    return {"architecture": recipe.model.architecture, "kwargs": dict(recipe.model.kwargs),
            "python_path": [str(folder) for folder in search_path(recipe)]}


def check_output_dir(output_dir: Path, force: bool) -> None:
    """Reject an existing output folder that is not empty, unless ``force`` is set."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not force:
        raise InputError(f"output folder {output_dir} already exists and is not empty; pass --force "
                         "(force=True from Python) to replace it")


def replacement_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    forms = tuple(REPLACEMENT_FORMS.values())
    return {name: module.spec() for name, module in model.named_modules() if isinstance(module, forms)}


def _check_outputs_match(original: nn.Module, compressed: nn.Module, example_input: torch.Tensor) -> None:
    """Raise CheckFailedError unless both models return the same tensors (names and shapes), tuples and dicts included."""
    with torch.no_grad():
        before, after = output_shapes(original(example_input)), output_shapes(compressed(example_input))
    if before != after:
        raise CheckFailedError(f"the compressed model's outputs {after} differ from the original's {before}")


def _with_reasons(rows: list[dict[str, Any]], results: list[PassResult]) -> list[dict[str, Any]]:
    """Add to each layer row why the decompose step chose its form, where it recorded a reason."""
    reasons = {change.name: change.details["reason"] for result in results if result.pass_name == "decompose"
               for change in result.changed if "reason" in change.details}
    for row in rows:
        if row["name"] in reasons:
            row["reason"] = reasons[row["name"]]
    return rows


def _model_summary(model: nn.Module, example_input: torch.Tensor, val_loader: Any) -> tuple[dict[str, Any], dict[str, int]]:
    macs, per_layer = count_macs(model, example_input)
    accuracy = evaluate_top1(model, val_loader) if val_loader is not None else None
    return {"params": count_params(model), "macs": macs, "accuracy": accuracy}, per_layer


def apply(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | Path,
    output_dir: str | Path | None = None,
    progress: bool | None = None,
    architecture: dict[str, Any] | None | Literal["recipe"] = "recipe",
    force: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compress ``model`` with ``recipe``; return the compressed model and the report.

    The input model is not modified. With ``output_dir`` the artifacts (model.onnx, model.pt,
    report.json, report.md, recipe.resolved.yaml) are written to a temporary folder next to it and
    moved into place only after export and parity succeed. An existing non-empty ``output_dir`` is
    replaced only with ``force``. ``progress`` shows a progress bar; by default only when stderr is a
    terminal. ``architecture`` sets how model.pt rebuilds the model's class: ``"recipe"`` takes
    ``model.architecture`` from the recipe when it names one, a dict gives it directly
    (``{"architecture", "kwargs", "python_path"}``), and None saves the whole module pickled.
    """
    recipe = with_input_shape(as_recipe(recipe), model)
    if architecture == "recipe":
        architecture = recipe_architecture(recipe)
    if output_dir is not None:
        check_output_dir(Path(output_dir), force)
    if progress is None:
        progress = sys.stderr.isatty()
    seed_everything(recipe.seed)
    started = time.perf_counter()
    original = copy.deepcopy(model).eval()
    example_input = torch.randn((1, *recipe.model.input_shape), generator=torch.Generator().manual_seed(recipe.seed))
    check_example_input(original, example_input)
    datasets = load_datasets(recipe)
    context = RunContext(recipe, example_input, datasets, progress)
    val_loader = make_loader(datasets.val, recipe.data) if datasets.val is not None else None

    original_summary, original_macs = _model_summary(original, example_input, val_loader)
    compressed, results = run_steps(original, original, context)
    if not any(result.changed for result in results if result.pass_name in ("decompose", "prune")):
        logger.warning("No layer was decomposed or pruned; check the steps' include patterns and the skipped list")
    _check_outputs_match(original, compressed, example_input)
    compressed_summary, compressed_macs = _model_summary(compressed, example_input, val_loader)

    report: dict[str, Any] = {
        "recipe": recipe.name,
        "seed": recipe.seed,
        "original": original_summary,
        "compressed": compressed_summary,
        "layers": _with_reasons(layer_table(original, compressed, original_macs, compressed_macs), results),
        "skipped": [{"pass": result.pass_name, **vars(skip)} for result in results for skip in result.skipped],
        "passes": [result.to_dict() for result in results],
        "macs_counted": "convolutions and linear layers; one MAC is one multiply-add, per sample",
        "environment": environment(),
        "recipe_resolved": recipe.model_dump(mode="json"),
    }
    parity_data = datasets.val if datasets.val is not None else datasets.train
    parity_inputs = sample_inputs(parity_data, recipe.export.parity.samples, recipe.model.input_shape, recipe.seed)
    with tempfile.TemporaryDirectory(prefix="slimmer-") as scratch:
        _export_and_measure(original, compressed, parity_inputs, recipe, report, Path(scratch), context)
        report["ratios"] = summary_ratios(report)
        report["timings_s"] = {**context.timings_s, "total": time.perf_counter() - started}
        if output_dir is not None:
            _write_outputs(Path(output_dir), Path(scratch), compressed, recipe, report, architecture)
    return compressed, report


def _export_and_measure(original: nn.Module, compressed: nn.Module, parity_inputs: torch.Tensor, recipe: Recipe,
                        report: dict[str, Any], scratch: Path, context: RunContext) -> None:
    started = time.perf_counter()
    original_onnx = export_onnx(original, context.example_input, scratch / "original.onnx", recipe.export.opset)
    compressed_onnx = export_onnx(compressed, context.example_input, scratch / "model.onnx", recipe.export.opset)
    parity = recipe.export.parity
    report["parity"] = check_parity(compressed_onnx, compressed, parity_inputs, parity.atol, parity.rtol)
    report["original"]["onnx_bytes"] = original_onnx.stat().st_size
    report["compressed"]["onnx_bytes"] = compressed_onnx.stat().st_size
    context.timings_s["export_and_parity"] = time.perf_counter() - started

    latency = recipe.report.latency
    report["original"]["latency_ms"] = {}
    report["compressed"]["latency_ms"] = {}
    if latency.enabled:
        started = time.perf_counter()
        timings = measure_latency({"original": original_onnx, "compressed": compressed_onnx},
                                  recipe.model.input_shape, latency.batch_sizes, latency.threads,
                                  latency.warmup, latency.runs, recipe.seed)
        report["original"]["latency_ms"] = {str(batch): value for batch, value in timings["original"].items()}
        report["compressed"]["latency_ms"] = {str(batch): value for batch, value in timings["compressed"].items()}
        report["latency_protocol"] = {"provider": "CPUExecutionProvider", "optimization": "ORT_ENABLE_ALL",
                                      "threads": latency.threads, "warmup": latency.warmup, "runs": latency.runs}
        context.timings_s["latency"] = time.perf_counter() - started


def _write_outputs(output_dir: Path, scratch: Path, compressed: nn.Module, recipe: Recipe, report: dict[str, Any],
                   architecture: dict[str, Any] | None) -> None:
    """Write every artifact into a temporary sibling folder, then move it into place in one rename."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        shutil.copyfile(scratch / "model.onnx", staging / "model.onnx")
        save_compressed(compressed, staging / "model.pt", architecture, replacement_specs(compressed))
        (staging / "recipe.resolved.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        write_report(report, staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Wrote %s", output_dir)
