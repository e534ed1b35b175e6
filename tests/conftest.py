"""Shared fixtures: the trained digits CNN, the trained CIFAR ResNet-20, and an in-process CLI runner."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import (REPOSITORY, RESNET20_ARCHITECTURE, RESNET20_CHECKPOINT, CliResult, require_shared,
                     restored_loggers)

# The suite is sized for two CPU cores shared with other jobs. With two OpenMP threads while another
# job used the cores, decomposing ResNet-20 took 13 s instead of 0.14 s: the small SVDs spin-wait.
torch.set_num_threads(1)

# The examples package (digits CNN, CIFAR ResNet) is imported from the repository root.
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))


@pytest.fixture(scope="session")
def trained_digits() -> nn.Module:
    """The demo CNN trained on scikit-learn's digits (a few seconds); copy it before changing it."""
    from examples.digits import train_digits_cnn

    return train_digits_cnn()


@pytest.fixture
def digits_model(trained_digits: nn.Module) -> nn.Module:
    return copy.deepcopy(trained_digits)


@pytest.fixture(scope="session")
def digits_checkpoint(trained_digits: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained digits CNN saved as ``{"state_dict": ...}``, as the demo saves it."""
    path = tmp_path_factory.mktemp("digits") / "digits.pt"
    torch.save({"state_dict": trained_digits.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def loaded_resnet20() -> nn.Module:
    import slimmer

    return slimmer.load_model(require_shared(RESNET20_CHECKPOINT), RESNET20_ARCHITECTURE, search_path=[REPOSITORY])


@pytest.fixture
def resnet20(loaded_resnet20: nn.Module) -> nn.Module:
    """The trained CIFAR ResNet-20 (87.5% top-1), a fresh copy per test."""
    return copy.deepcopy(loaded_resnet20)


@pytest.fixture
def cifar_input() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Call ``slimmer.cli.main`` in this process; returns a function giving exit code, stdout and stderr."""
    from slimmer.cli import main

    def run(*arguments: str | Path) -> CliResult:
        capsys.readouterr()
        exit_code = main([str(argument) for argument in arguments])
        captured = capsys.readouterr()
        return CliResult(exit_code, captured.out, captured.err)

    # main() points the slimmer logger at the captured stderr, which closes after this test.
    with restored_loggers():
        yield run
