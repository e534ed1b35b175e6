"""Checkpoints that let an interrupted run continue: ``slimmer apply --resume``.

While a finetune step runs with an output folder ``out``, the run keeps one checkpoint in the
work folder ``out.partial/checkpoint.pt``, replaced atomically each time. It contains the
compressed model (structure as :func:`slimmer.model_io.compressed_payload` records it, and
weights), the fine-tuning state (optimizer, learning-rate schedule, step, data order, random
number generator states) and the records of the steps before. It also contains the recipe
settings that produced the state and a SHA-256 fingerprint of the input model's weights, and a
resumed run must match both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from slimmer.errors import InputError
from slimmer.model_io import compressed_payload, read_checkpoint, replacement_specs
from slimmer.recipe import FinetuneStep, Recipe

if TYPE_CHECKING:
    from slimmer.finetune import FinetuneState

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "slimmer.run-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"
# Finetune settings that change how often the state is saved, not the state itself.
SETTINGS_NOT_COMPARED = ("checkpoint_every",)


def work_dir(output_dir: str | Path) -> Path:
    """Return the work folder of a run writing to ``output_dir``: its sibling ``<name>.partial``."""
    output_dir = Path(output_dir)
    if output_dir.name in ("", ".", ".."):
        output_dir = output_dir.resolve()
    return output_dir.with_name(f"{output_dir.name}.partial")


def capture_rng_states() -> dict[str, Any]:
    """Return the states of Python's, NumPy's and torch's global random number generators."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random number generators to states from :func:`capture_rng_states`."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])


def model_fingerprint(model: nn.Module) -> str:
    """Return the SHA-256 of the model's state_dict: names, dtypes, shapes and bytes of every entry."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{key}|{value!r}|".encode())
    return digest.hexdigest()


def recipe_settings(recipe: Recipe, step_index: int) -> dict[str, Any]:
    """Return the recipe settings that determine the state reached within ``steps[step_index]``.

    These are ``seed``, ``model``, ``data`` and the steps up to that one, less the settings in
    ``SETTINGS_NOT_COMPARED``. Export and report settings, and the later steps, may change before a resume.
    """
    resolved = recipe.model_dump(mode="json")
    steps = []
    for step in resolved["steps"][: step_index + 1]:
        kind, config = next(iter(step.items()))
        steps.append({kind: {key: value for key, value in config.items() if key not in SETTINGS_NOT_COMPARED}})
    return {"seed": resolved["seed"], "model": resolved["model"], "data": resolved["data"], "steps": steps}


@dataclass
class RunCheckpoint:
    """One saved point of a run, inside ``steps[step_index]`` (a finetune step)."""

    step_index: int
    recipe_settings: dict[str, Any]  # recipe_settings(recipe, step_index) of the run that saved it
    model_fingerprint: str  # model_fingerprint() of the input model
    compressed: dict[str, Any]  # compressed_payload() of the model being fine-tuned
    passes: list[dict[str, Any]]  # PassResult.to_dict() of the steps before steps[step_index]
    timings_s: dict[str, float]  # the run's timings so far, by stage
    finetune: dict[str, Any]  # FinetuneState.to_dict()


def save_run_checkpoint(folder: Path, checkpoint: RunCheckpoint) -> Path:
    """Write ``folder/checkpoint.pt`` through a temporary file, so a crash never leaves half a checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    temporary = folder / f"{CHECKPOINT_FILE}.tmp"
    payload = {"format": CHECKPOINT_FORMAT,
               **{item.name: getattr(checkpoint, item.name) for item in fields(RunCheckpoint)}}
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return path


def load_run_checkpoint(folder: Path, allow_pickle: bool = False,
                        search_path: list[Path] | None = None) -> RunCheckpoint:
    """Read ``folder/checkpoint.pt``; a checkpoint of a pickled model needs ``allow_pickle``."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise InputError(f"cannot resume: no checkpoint found at {path}; run without --resume "
                         "(resume=False from Python) to start over")
    payload = read_checkpoint(path, allow_pickle=allow_pickle, search_path=search_path)
    names = [item.name for item in fields(RunCheckpoint)]
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or not set(names) <= set(payload):
        raise InputError(f"cannot resume: {path} is not a slimmer run checkpoint ({CHECKPOINT_FORMAT}); "
                         f"delete {folder} or pass --force to start over")
    return RunCheckpoint(**{name: payload[name] for name in names})


def check_resumable(checkpoint: RunCheckpoint, recipe: Recipe, fingerprint: str, folder: Path) -> None:
    """Raise InputError unless ``checkpoint`` was made with the same model and recipe settings."""
    start_over = "or start over without --resume and with --force (resume=False, force=True from Python)"
    if checkpoint.model_fingerprint != fingerprint:
        raise InputError(f"cannot resume from {folder}: its checkpoint was made from a model with other weights; "
                         f"pass the input model of the interrupted run, {start_over}")
    current = recipe_settings(recipe, checkpoint.step_index)
    differences = _differences(checkpoint.recipe_settings, current)
    if differences:
        listed = ", ".join(differences[:4]) + (f", ... ({len(differences)} in all)" if len(differences) > 4 else "")
        raise InputError(f"cannot resume from {folder}: the recipe differs from the one its checkpoint was made "
                         f"with at {listed}; restore those settings, {start_over}")


def _differences(saved: Any, current: Any, place: str = "") -> list[str]:
    """List the places (``steps[2].finetune.lr``) where two JSON-like documents differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in list(saved) + [key for key in current if key not in saved]:
            child = f"{place}.{key}" if place else str(key)
            if key not in saved or key not in current:
                found.append(child)
            else:
                found.extend(_differences(saved[key], current[key], child))
        return found
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [difference for index, (left, right) in enumerate(zip(saved, current))
                for difference in _differences(left, right, f"{place}[{index}]")]
    return [] if json.dumps(saved, sort_keys=True) == json.dumps(current, sort_keys=True) else [place or "(top level)"]


@dataclass
class CheckpointTarget:
    """The work folder and the records a run saves its fine-tuning checkpoints with."""

    folder: Path
    model_fingerprint: str
    architecture: dict[str, Any] | None  # as save_compressed takes it


def prepare_work_dir(model: nn.Module, recipe: Recipe, output_dir: Path, architecture: dict[str, Any] | None,
                     force: bool, resume: bool,
                     search_path: list[Path]) -> tuple[CheckpointTarget | None, RunCheckpoint | None]:
    """Check the work folder beside ``output_dir``; return where to save checkpoints and the one to resume from.

    Without ``resume``, partial work from an earlier run is rejected, or removed with ``force``.
    The target is None for a recipe without a finetune step.
    """
    folder = work_dir(output_dir)
    saved = None
    fingerprint = None
    if resume:
        saved = load_run_checkpoint(folder, allow_pickle=architecture is None, search_path=search_path)
        fingerprint = model_fingerprint(model)
        check_resumable(saved, recipe, fingerprint, folder)
    elif folder.exists():
        if not force:
            raise InputError(f"partial work of an interrupted run is in {folder}; pass --resume (resume=True from "
                             "Python) to continue it, or --force (force=True) to discard it")
        logger.info("Removing the partial work in %s (force)", folder)
        if folder.is_dir():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    if not any(isinstance(step, FinetuneStep) for step in recipe.steps):
        return None, saved
    return CheckpointTarget(folder, fingerprint or model_fingerprint(model), architecture), saved


def checkpoint_writer(target: CheckpointTarget, recipe: Recipe, step_index: int, pass_records: list[dict[str, Any]],
                      timings_s: dict[str, float]) -> Callable[[nn.Module, FinetuneState], None]:
    """Return the function that saves a checkpoint inside ``steps[step_index]`` for the finetune pass.

    ``pass_records`` are the ``PassResult.to_dict()`` records of the steps before.
    """
    settings = recipe_settings(recipe, step_index)
    # Through JSON, as report.json stores them: the records then load with torch.load(weights_only=True).
    passes = json.loads(json.dumps(pass_records, default=str))
    timings_s = dict(timings_s)

    def write(model: nn.Module, state: FinetuneState) -> None:
        payload = compressed_payload(model, target.architecture, replacement_specs(model))
        checkpoint = RunCheckpoint(step_index, settings, target.model_fingerprint, payload, passes, timings_s,
                                   state.to_dict())
        path = save_run_checkpoint(target.folder, checkpoint)
        logger.debug("Saved a checkpoint after fine-tune step %d to %s", state.step, path)

    return write
