"""The shipped ResNet-56 half-MACs recipe, end to end on the real checkpoint and images (several minutes).

Marked slow: run by bench/run_benchmarks.sh, not by the default test command. Latency targets are
checked by bench/bench_resnet.py, because timed assertions do not belong in tests.
"""

from __future__ import annotations

import json

import pytest

from helpers import REPOSITORY, SHARED, require_shared, run_cli_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def resnet56_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    checkpoint = require_shared(SHARED / "models" / "resnet56-cifar10-jpeg.th")
    output = tmp_path_factory.mktemp("resnet56") / "out"
    completed = run_cli_process("apply", "recipes/resnet56-half-macs.yaml", checkpoint, "-o", output,
                                "report.latency.enabled=false", cwd=REPOSITORY, timeout_s=1800)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads((output / "report.json").read_text())


def test_resnet56_half_macs(resnet56_report: dict) -> None:
    assert resnet56_report["ratios"]["macs"] <= 0.5


def test_resnet56_original_accuracy(resnet56_report: dict) -> None:
    assert resnet56_report["original"]["accuracy"] == pytest.approx(89.0, abs=0.1)


def test_resnet56_accuracy_drop(resnet56_report: dict) -> None:
    drop = resnet56_report["original"]["accuracy"] - resnet56_report["compressed"]["accuracy"]
    assert drop <= 2.5


def test_resnet56_parity(resnet56_report: dict) -> None:
    assert resnet56_report["parity"]["passed"]
