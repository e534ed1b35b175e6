"""The coverage run of bench/coverage_zoo.py on a few torchvision models, at small input sizes.

Slow, so run by bench/run_benchmarks.sh and not by the default test command. Each model adds a
structure at full scale to the small patterns of test_graph_patterns.py. ResNet-18 has residual
streams pruned across whole stages, DenseNet-121 and Inception v3 concatenate, and torch-pruning
cannot trace ShuffleNet V2 as a whole. DeepLabV3 has dilated convolutions and a dict output.
"""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import REPOSITORY

sys.path.insert(0, str(REPOSITORY / "bench"))
import coverage_zoo  # noqa: E402

pytestmark = pytest.mark.slow


def skip_reasons(outcome: coverage_zoo.Outcome, pass_name: str) -> dict[str, str]:
    return {skip["name"]: skip["reason"] for skip in outcome.report["skipped"] if skip["pass"] == pass_name}


def changed_names(outcome: coverage_zoo.Outcome, pass_name: str) -> set[str]:
    entry = next(entry for entry in outcome.report["passes"] if entry["pass"] == pass_name)
    if pass_name == "prune":
        return {change["details"]["root"] for change in entry["changed"]}
    return {change["name"] for change in entry["changed"]}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_resnet18_prunes_residual_streams() -> None:
    outcome = coverage_zoo.run_model("resnet18", size=64)

    assert outcome.passed, outcome.error
    assert "layer1.0.conv1" in changed_names(outcome, "decompose")
    # The residual stream of layer2 (downsample and every block's last 1x1) is one channel group,
    # pruned once: 128 channels lose a quarter.
    prune_pass = next(entry for entry in outcome.report["passes"] if entry["pass"] == "prune")
    stream = [change for change in prune_pass["changed"] if change["name"] == "layer2.0.conv2.expand"]
    assert stream
    assert stream[0]["before"].endswith("128 channels")
    assert stream[0]["after"].endswith("96 channels")
    assert outcome.report["ratios"]["macs"] < 0.5


def test_densenet121_concatenations() -> None:
    outcome = coverage_zoo.run_model("densenet121", size=64)

    assert outcome.passed, outcome.error
    assert "features.denseblock1.denselayer1.conv2" in changed_names(outcome, "decompose")
    assert "features.denseblock1.denselayer1.conv1" in changed_names(outcome, "prune")


def test_inception_v3_non_square() -> None:
    outcome = coverage_zoo.run_model("inception_v3", size=96)
    assert outcome.passed, outcome.error
    decomposed = changed_names(outcome, "decompose")

    assert "Mixed_6b.branch7x7_2.conv" in decomposed
    assert "Mixed_6b.branch7x7_3.conv" in decomposed
    assert skip_reasons(outcome, "decompose")["AuxLogits.conv0.conv"] == (
        "not called in a forward pass on the example input")


def test_shufflenet_pruned_in_parts() -> None:
    outcome = coverage_zoo.run_model("shufflenet_v2_x1_0", size=64)
    reasons = skip_reasons(outcome, "prune")
    prune = next(entry for entry in outcome.report["passes"] if entry["pass"] == "prune")
    traced = {change["details"]["root"]: change["details"].get("traced_module") for change in prune["changed"]}

    assert outcome.passed, outcome.error
    assert traced["stage2.1.branch2.0"] == "stage2.1.branch2"
    # The branch output joins the other half of the channels, and only the whole graph contains that group.
    assert reasons["stage2.1.branch2.5"].startswith(
        "torch-pruning could not build the dependency graph of the whole model (ZeroDivisionError")


def test_deeplabv3_dict_output() -> None:
    outcome = coverage_zoo.run_model("deeplabv3_mobilenet_v3_large", size=64)

    assert outcome.passed, outcome.error
    assert "classifier.0.convs.1.0" in changed_names(outcome, "decompose")
    assert outcome.report["parity"]["outputs"] == 1
