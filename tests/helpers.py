"""Paths, recipes and CLI runners the test modules share (fixtures live in conftest.py).

The real data lives in ``shared/`` beside the repository (``<repo>/../shared``), as CI lays it out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared"
RESNET20_CHECKPOINT = SHARED / "models" / "resnet20-cifar10-jpeg.th"
CIFAR_FOLDER = SHARED / "data" / "cifar10-jpeg"
CIFAR_NORMALIZE = {"normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
RESNET20_ARCHITECTURE = "examples.cifar_resnet:resnet20"
DIGITS_ARCHITECTURE = "examples.digits:digits_cnn"
OUTPUT_FILES = ("model.onnx", "model.pt", "report.json", "report.md", "recipe.resolved.yaml")

# One OpenMP thread in CLI subprocesses too (see conftest.py for why).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} not found; the tests expect the shared/ folder beside the repository")
    return path


def digits_recipe(**sections: Any) -> dict[str, Any]:
    """A recipe for the digits CNN with the repository on the import path and latency off (fast)."""
    recipe: dict[str, Any] = {
        "name": "digits-test",
        "model": {"architecture": DIGITS_ARCHITECTURE, "python_path": [str(REPOSITORY)],
                  "state_dict_key": "state_dict", "input_shape": [1, 8, 8]},
        "data": {"train": {"callable": "examples.digits:digits_dataset", "kwargs": {"split": "train"}},
                 "val": {"callable": "examples.digits:digits_dataset", "kwargs": {"split": "val"}}},
        "steps": [{"decompose": {"rank": {"ratio": 0.5}}},
                  {"prune": {"ratio": 0.5}},
                  {"finetune": {"steps": 3, "batch_size": 32, "optimizer": "adamw", "lr": 0.001}}],
        "export": {"parity": {"samples": 16}},
        "report": {"latency": {"enabled": False}},
    }
    recipe.update(sections)
    return recipe


def write_yaml(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


def run_cli_process(*arguments: str | Path, cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m slimmer.cli`` as a separate process, as a shell user would."""
    command = [sys.executable, "-m", "slimmer.cli", *map(str, arguments)]
    return subprocess.run(command, cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def restored_loggers() -> Iterator[None]:
    """Put back the handlers and levels of slimmer's loggers, which ``slimmer.cli.main`` sets, on exit."""
    loggers = [logging.getLogger(name) for name in
               ("slimmer", "slimmer.decompose", "slimmer.prune", "slimmer.cost", "slimmer.export")]
    saved = [(logger, logger.handlers[:], logger.level) for logger in loggers]
    try:
        yield
    finally:
        for logger, handlers, level in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
