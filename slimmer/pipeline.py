"""apply(): runs a recipe's steps in order, then exports, verifies and measures.

This is the only module that defines the order of the stages.
"""

from __future__ import annotations

import copy
import logging
import os
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

from slimmer.checkpoint import (CHECKPOINT_FILE, CheckpointTarget, RunCheckpoint, capture_rng_states, checkpoint_writer,
                                prepare_work_dir, restore_rng_states)
from slimmer.cost import count_macs, count_params, measure_latency, output_shapes
from slimmer.data import build_dataset, check_label_range, check_sample_shape, evaluate_top1, make_loader, sample_inputs
from slimmer.decompose import decompose
from slimmer.decompose.refit import refit
from slimmer.errors import CheckFailedError, InputError
from slimmer.export import check_parity, compressed_model_failure, export_onnx
from slimmer.finetune import FinetuneState, finetune
from slimmer.model_io import load_compressed, replacement_specs, save_compressed
from slimmer.graph import default_input_shape
from slimmer.passes import PassResult
from slimmer.prune import prune
from slimmer.recipe import DecomposeStep, FinetuneStep, PruneStep, Recipe, RefitStep, load_recipe, recipe_from_dict
from slimmer.report import achieved_share, environment, layer_table, summary_ratios, write_report

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
    checkpoints: CheckpointTarget | None = None  # None: no checkpoints (no output folder)
    resume_from: RunCheckpoint | None = None


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
    """Build the datasets the recipe names; fine-tuning requires ``data.train``.

    The first sample of each must be a tensor of shape ``model.input_shape``. Reading it leaves the
    global random number generators as they were, so random transforms draw as without the check.
    """
    folders = search_path(recipe)
    datasets = Datasets()
    for name in ("train", "val", "calibration"):
        config = getattr(recipe.data, name)
        if config is None:
            continue
        dataset = build_dataset(config, recipe.resolve_path, folders, recipe.seed, f"data.{name}")
        rng_states = capture_rng_states()
        check_sample_shape(dataset, recipe.model.input_shape, f"data.{name}")
        restore_rng_states(rng_states)
        setattr(datasets, name, dataset)
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
    """Run the recipe's steps in order on a copy of ``model``; ``teacher`` is the original for distillation.

    With ``context.resume_from``, the model and the records of the steps before the checkpoint come
    from the checkpoint, and the run continues inside the finetune step that saved it.
    """
    results: list[PassResult] = []
    first_step = 0
    saved = context.resume_from
    if saved is not None:
        model = _model_from_checkpoint(saved, context)
        results = [PassResult.from_dict(record, model) for record in saved.passes]
        first_step = saved.step_index
        context.timings_s.update(saved.timings_s)
    else:
        model = copy.deepcopy(model)
    for index, step in enumerate(context.recipe.steps[first_step:], first_step):
        started = time.perf_counter()
        if isinstance(step, DecomposeStep):
            images = None
            if step.decompose.form == "auto" or step.decompose.target is not None:
                images = calibration_images(context, step.decompose.calibration_images)
            config = step.decompose
            if config.target is not None and config.target.latency_cache is not None:
                cache = str(context.recipe.resolve_path(config.target.latency_cache))
                config = config.model_copy(update={"target": config.target.model_copy(update={"latency_cache": cache})})
            result = decompose(model, config, context.example_input, inplace=True, calibration_inputs=images)
        elif isinstance(step, RefitStep):
            images = calibration_images(context, step.refit.images)
            result = refit(model, teacher, step.refit, images, inplace=True)
        elif isinstance(step, PruneStep):
            result = prune(model, step.prune, context.example_input, inplace=True)
        elif isinstance(step, FinetuneStep):
            config = step.finetune
            loader = make_loader(context.datasets.train, context.recipe.data, batch_size=config.batch_size,
                                 shuffle=True, seed=context.recipe.seed + index)
            resume_state = FinetuneState.from_dict(saved.finetune) if saved is not None and index == first_step else None
            on_checkpoint = None
            if context.checkpoints is not None:
                on_checkpoint = checkpoint_writer(context.checkpoints, context.recipe, index,
                                                  [result.to_dict() for result in results], context.timings_s)
            result = finetune(model, config, loader, teacher if config.distill else None, inplace=True,
                              progress=context.progress, resume_from=resume_state, on_checkpoint=on_checkpoint)
        else:
            raise TypeError(f"unknown step type {type(step).__name__}")
        model = result.model
        results.append(result)
        context.timings_s[f"steps[{index}].{result.pass_name}"] = time.perf_counter() - started
        logger.info("Step %d (%s): %d layers changed, %d skipped", index, result.pass_name,
                    len(result.changed), len(result.skipped))
    return model.eval(), results


def _model_from_checkpoint(saved: RunCheckpoint, context: RunContext) -> nn.Module:
    assert context.checkpoints is not None
    path = context.checkpoints.folder / CHECKPOINT_FILE
    model = load_compressed(path, search_path(context.recipe), checkpoint=saved.compressed,
                            allow_pickle=context.checkpoints.architecture is None)
    logger.info("Resuming from %s inside steps[%d]", path, saved.step_index)
    return model


def with_input_shape(recipe: Recipe, model: nn.Module) -> Recipe:
    """Return ``recipe``, or a copy with ``model.input_shape`` taken from the model when the recipe leaves it out."""
    if "input_shape" in recipe.model.model_fields_set:
        return recipe
    recipe = recipe.model_copy(deep=True)
    recipe.model.input_shape = default_input_shape(model)
    logger.info("model.input_shape not given; using %s (the first convolution's input channels)",
                recipe.model.input_shape)
    return recipe


def recipe_architecture(recipe: Recipe) -> dict[str, Any] | None:
    """Return the recipe's model class as :func:`slimmer.model_io.save_compressed` records it, or None."""
    if recipe.model.architecture is None:
        return None
    return {"architecture": recipe.model.architecture, "kwargs": dict(recipe.model.kwargs),
            "python_path": [str(folder) for folder in search_path(recipe)]}


def check_output_dir(output_dir: Path, force: bool) -> None:
    """Reject an existing output folder that is not empty, unless ``force`` is set, and a path that is not a folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output path {output_dir} exists and is not a folder; choose another -o")
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise InputError(f"output folder {output_dir} already exists and is not empty; pass --force "
                         "(force=True from Python) to replace it")


def _check_model_takes(model: nn.Module, example_input: torch.Tensor) -> int | None:
    """Raise InputError when ``model`` fails on an input of ``model.input_shape``, before any step runs.

    Return the number of classes when the output is ``(N, classes)`` logits, else None.
    """
    try:
        with torch.no_grad():
            output = model(example_input)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"the model fails on an input of shape {list(example_input.shape)} (model.input_shape "
                         f"with a batch axis): {detail}; set model.input_shape to the shape of one input") from None
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return output.shape[1]
    return None


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
    resume: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compress ``model`` with ``recipe``; return the compressed model and the report.

    The input model is not modified. With ``output_dir`` the artifacts (model.onnx, model.pt,
    report.json, report.md, recipe.resolved.yaml) are written to a temporary folder next to it and
    moved into place only after export and parity succeed. An existing non-empty ``output_dir`` is
    replaced only with ``force``. ``progress`` shows a progress bar; by default only when stderr is a
    terminal. ``architecture`` sets how model.pt rebuilds the model's class: ``"recipe"`` takes
    ``model.architecture`` from the recipe when it names one, a dict gives it directly
    (``{"architecture", "kwargs", "python_path"}``), and None saves the whole module pickled.

    With ``output_dir``, finetune steps save checkpoints to the work folder ``<output_dir>.partial``
    (see :mod:`slimmer.checkpoint`), which is removed after success. ``resume`` continues from its
    checkpoint, for the same ``model`` and recipe settings. Without ``resume``, an existing work
    folder is rejected, or discarded with ``force``. An exception raised after a checkpoint was
    saved has the attribute ``partial_work``, the work folder.
    """
    recipe = with_input_shape(as_recipe(recipe), model)
    if architecture == "recipe":
        architecture = recipe_architecture(recipe)
    checkpoints = saved = None
    if output_dir is not None:
        output_dir = Path(output_dir)
        check_output_dir(output_dir, force)
        checkpoints, saved = prepare_work_dir(model, recipe, output_dir, architecture, force, resume,
                                              search_path(recipe))
    elif resume:
        raise InputError("resume needs output_dir, the output folder of the interrupted run")
    try:
        compressed, report = _run(model, recipe, output_dir, progress, architecture, checkpoints, saved)
    except BaseException as error:
        if checkpoints is not None and (checkpoints.folder / CHECKPOINT_FILE).is_file():
            error.partial_work = checkpoints.folder  # type: ignore[attr-defined]
        raise
    if checkpoints is not None and checkpoints.folder.exists():
        shutil.rmtree(checkpoints.folder, ignore_errors=True)
    return compressed, report


def _run(model: nn.Module, recipe: Recipe, output_dir: Path | None, progress: bool | None,
         architecture: dict[str, Any] | None, checkpoints: CheckpointTarget | None,
         saved: RunCheckpoint | None) -> tuple[nn.Module, dict[str, Any]]:
    if progress is None:
        progress = sys.stderr.isatty()
    seed_everything(recipe.seed)
    started = time.perf_counter()
    original = copy.deepcopy(model).eval()
    example_input = torch.randn((1, *recipe.model.input_shape), generator=torch.Generator().manual_seed(recipe.seed))
    classes = _check_model_takes(original, example_input)
    datasets = load_datasets(recipe)
    if classes is not None:
        for name in ("train", "val", "calibration"):
            if getattr(datasets, name) is not None:
                check_label_range(getattr(datasets, name), classes, f"data.{name}")
    context = RunContext(recipe, example_input, datasets, progress, checkpoints=checkpoints, resume_from=saved)
    val_loader = make_loader(datasets.val, recipe.data) if datasets.val is not None else None

    original_summary, original_macs = _model_summary(original, example_input, val_loader)
    compressed, results = run_steps(original, original, context)
    if not any(result.changed for result in results if result.pass_name in ("decompose", "prune")):
        logger.warning("No layer was decomposed or pruned; check the steps' include patterns and the skipped list")
    _check_outputs_match(original, compressed, example_input)
    try:
        compressed_summary, compressed_macs = _model_summary(compressed, example_input, val_loader)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise compressed_model_failure("the compressed PyTorch model", error) from error

    sensitivity = [result.stats.pop("sensitivity") for result in results if "sensitivity" in result.stats]
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "seed": recipe.seed,
        "original": original_summary,
        "compressed": compressed_summary,
        "layers": _with_reasons(layer_table(original, compressed, original_macs, compressed_macs), results),
        "skipped": [{"pass": result.pass_name, **vars(skip)} for result in results for skip in result.skipped],
        "passes": [result.to_dict() for result in results],
        "macs_counted": "convolutions and linear layers; one MAC is one multiply-add, per sample",
        **({"sensitivity": [row for rows in sensitivity for row in rows]} if sensitivity else {}),
        "environment": environment(),
        "recipe_resolved": recipe.dump_with_absolute_paths(),
        "resumed_from": None if saved is None else {"step": f"steps[{saved.step_index}]",
                                                     "finetune_step": saved.finetune["step"]},
    }
    parity_data = datasets.val if datasets.val is not None else datasets.train
    parity_inputs = sample_inputs(parity_data, recipe.export.parity.samples, recipe.model.input_shape, recipe.seed)
    with tempfile.TemporaryDirectory(prefix="slimmer-") as scratch:
        _export_and_measure(original, compressed, parity_inputs, recipe, report, Path(scratch), context)
        report["ratios"] = summary_ratios(report)
        plans = [result.stats["plan"] for result in results if "plan" in result.stats]
        if plans:
            report["plan"] = [{**plan, "achieved": achieved_share(plan, report)} for plan in plans]
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


def _current_umask() -> int:
    """Return the process's umask; os.umask reads it only by replacing it, so it is put back at once."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _write_outputs(output_dir: Path, scratch: Path, compressed: nn.Module, recipe: Recipe, report: dict[str, Any],
                   architecture: dict[str, Any] | None) -> None:
    """Write every artifact into a temporary sibling folder, then move it into place in one rename."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        staging.chmod(0o777 & ~_current_umask())  # mkdtemp makes it 0700, whatever the umask
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
