"""Run slimmer on common torchvision architectures and record what it did in docs/coverage.md.

    python bench/coverage_zoo.py                          # every model, writes docs/coverage.md
    python bench/coverage_zoo.py --models resnet18 googlenet  # a subset, printed only
    python bench/coverage_zoo.py --models resnet18 --size 64  # at another input size

Each model is built with ``weights=None`` (random weights, seeded, nothing downloaded) and its
batch-norm statistics are set from one batch of random images, so activations keep a unit
scale in eval mode and the parity numbers mean something. Then ``slimmer.apply`` runs
COVERAGE_RECIPE (decompose, prune, ONNX export with the parity check). A model passes when
apply succeeds and these checks hold:

- the compressed model returns the same tensors, of the same shapes, as the original;
- onnxruntime matches PyTorch within the recipe's tolerance at batch 3 (inside apply) and at
  batch 1, and every ONNX output has a dynamic batch axis;
- every convolution of the model is either rewritten or listed as skipped with a reason, and so
  is every 1x1 convolution the prune step could target.

Random weights give flat singular-value spectra, so the numbers show what slimmer can rewrite in
each architecture, not the accuracy a trained model would keep.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import logging
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx
import torch
import torchvision
import yaml
from torch import nn

REPOSITORY = Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

import slimmer  # noqa: E402
from slimmer.cost import output_shapes  # noqa: E402
from slimmer.data import sample_inputs  # noqa: E402
from slimmer.layers import TuckerBottleneck  # noqa: E402
from slimmer.report import environment  # noqa: E402

COVERAGE_PAGE = REPOSITORY / "docs" / "coverage.md"
SEED = 0

# The shortest recipe with every stage that needs no data: decompose at half rank, prune every 1x1
# group torch-pruning can trace, export. Tolerances are the recipe defaults.
COVERAGE_RECIPE: dict[str, Any] = {
    "name": "coverage",
    "seed": SEED,
    "steps": [{"decompose": {"rank": {"ratio": 0.5}}},
              {"prune": {"targets": "all_1x1", "ratio": 0.25}}],
    "export": {"parity": {"samples": 3}},
    "report": {"latency": {"enabled": False}},
}


@dataclass
class ZooModel:
    """A torchvision builder, its keyword arguments and the side of the square input image."""

    builder: Callable[..., nn.Module]
    size: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


MODELS: dict[str, ZooModel] = {
    "resnet18": ZooModel(torchvision.models.resnet18, 224),
    "resnet50": ZooModel(torchvision.models.resnet50, 224),
    "wide_resnet50_2": ZooModel(torchvision.models.wide_resnet50_2, 224),
    "resnext50_32x4d": ZooModel(torchvision.models.resnext50_32x4d, 224),
    "vgg11_bn": ZooModel(torchvision.models.vgg11_bn, 224),
    "densenet121": ZooModel(torchvision.models.densenet121, 224),
    "googlenet": ZooModel(
        torchvision.models.googlenet, 224, {"aux_logits": True, "init_weights": True},
        "aux_logits=True: the two auxiliary heads run only in training mode, so their layers are skipped as "
        "not called; in eval mode the model returns the main logits alone. transform_input=False (the "
        "torchvision default without weights); with it, forward rescales the input channels before conv1, "
        "which changes no layer slimmer rewrites."),
    "inception_v3": ZooModel(
        torchvision.models.inception_v3, 299, {"aux_logits": True, "init_weights": True},
        "aux_logits=True, as for googlenet: the auxiliary head runs only in training mode. 299 is the size the "
        "architecture was designed for."),
    "mobilenet_v2": ZooModel(torchvision.models.mobilenet_v2, 224),
    "mobilenet_v3_large": ZooModel(torchvision.models.mobilenet_v3_large, 224),
    "shufflenet_v2_x1_0": ZooModel(torchvision.models.shufflenet_v2_x1_0, 224),
    "squeezenet1_1": ZooModel(torchvision.models.squeezenet1_1, 224),
    "regnet_y_400mf": ZooModel(torchvision.models.regnet_y_400mf, 224),
    "efficientnet_b0": ZooModel(torchvision.models.efficientnet_b0, 224),
    "convnext_tiny": ZooModel(torchvision.models.convnext_tiny, 224),
    "deeplabv3_mobilenet_v3_large": ZooModel(
        torchvision.models.segmentation.deeplabv3_mobilenet_v3_large, 224, {"weights_backbone": None},
        "Returns {\"out\": ...}; ASPP has 3x3 convolutions at dilation 12, 24 and 36."),
    "fcn_resnet50": ZooModel(
        torchvision.models.segmentation.fcn_resnet50, 224, {"weights_backbone": None, "aux_loss": True},
        "aux_loss=True: returns {\"out\": ..., \"aux\": ...}; layer3 and layer4 use dilation 2 and 4 "
        "instead of stride."),
}


@dataclass
class Outcome:
    """The record of one model's run, for the table."""

    name: str
    size: int
    passed: bool = False
    error: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    output_scale: float = 0.0
    batch1_max_abs_diff: float = 0.0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def build_model(name: str) -> nn.Module:
    """Build ``name`` with random weights seeded by SEED, in eval mode."""
    spec = MODELS[name]
    torch.manual_seed(SEED)
    return spec.builder(weights=None, **spec.kwargs).eval()


@torch.no_grad()
def set_batchnorm_statistics(model: nn.Module, size: int, batch_size: int = 8) -> None:
    """Set every batch norm's running mean and variance from one batch of random images ``(8, 3, size, size)``."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    # Only the batch norms train, so the model runs its eval-mode path: without the auxiliary heads
    # of googlenet and inception_v3, which need larger inputs, and without dropout.
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: after one batch, that batch's statistics
        norm.train()
    model(torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(SEED + 1)))
    for norm in norms:
        norm.momentum = 0.1
        norm.eval()


class _WarningCollector(logging.Handler):
    """Keep the distinct warnings slimmer logs during one run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # A group kept out of pruning is already listed with its reason among the skipped layers.
        if not message.startswith("Kept ") and message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def collect_warnings():
    collector = _WarningCollector()
    logger = logging.getLogger("slimmer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(collector)
    try:
        yield collector.messages
    finally:
        logger.removeHandler(collector)
        logger.setLevel(level)


def prune_candidates(model: nn.Module) -> list[str]:
    """Convolutions an all_1x1 prune step considers: each bottleneck's reduce and core, then every 1x1 conv.

    Pruning narrows layers but removes none, so the names are the same in the compressed model.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, TuckerBottleneck):
            names += [f"{name}.reduce"] if hasattr(module, "reduce") else []
            names += [f"{name}.core"] if hasattr(module, "expand") else []
        elif (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
              and name not in names):
            names.append(name)
    return names


def unaccounted_layers(original: nn.Module, compressed: nn.Module, report: dict[str, Any]) -> list[str]:
    """Layers the report neither changed nor listed as skipped: convolutions for decompose, targets for prune."""
    passes = {entry["pass"]: entry for entry in report["passes"]}
    decompose, prune = passes["decompose"], passes["prune"]
    listed = {change["name"] for change in decompose["changed"]} | {skip["name"] for skip in decompose["skipped"]}
    missing = [name for name, module in original.named_modules() if isinstance(module, nn.Conv2d) and name not in listed]

    roots = {change["details"]["root"] for change in prune["changed"]}
    skipped = {skip["name"] for skip in prune["skipped"]}
    for name in prune_candidates(compressed):
        # A bottleneck skipped as a whole covers its reduce and core.
        if name not in roots and name not in skipped and name.rpartition(".")[0] not in skipped:
            missing.append(name)
    return missing


def check_batch_one(onnx_path: Path, compressed: nn.Module, recipe: slimmer.Recipe) -> float:
    """Run onnxruntime on one input at a time and return the max abs difference (raises past the tolerance)."""
    inputs = sample_inputs(None, 2, recipe.model.input_shape, seed=SEED + 2)
    parity = recipe.export.parity
    return slimmer.check_parity(onnx_path, compressed, inputs, parity.atol, parity.rtol, batch_size=1)["max_abs_diff"]


def dynamic_batch_axis(onnx_path: Path) -> bool:
    graph = onnx.load(str(onnx_path)).graph
    tensors = [*graph.input, *graph.output]
    return all(tensor.type.tensor_type.shape.dim[0].dim_param == "batch" for tensor in tensors)


def run_model(name: str, size: int | None = None) -> Outcome:
    """Build one model, run COVERAGE_RECIPE on it and check the result."""
    spec = MODELS[name]
    size = size or spec.size
    outcome = Outcome(name, size)
    started = time.perf_counter()
    try:
        original = build_model(name)
        set_batchnorm_statistics(original, size)
        recipe = slimmer.recipe_from_dict({**COVERAGE_RECIPE, "model": {"input_shape": [3, size, size]}})
        with tempfile.TemporaryDirectory(prefix="coverage-") as folder, collect_warnings() as warnings:
            compressed, report = slimmer.apply(original, recipe, output_dir=Path(folder) / "out", architecture=None)
            onnx_path = Path(folder) / "out" / "model.onnx"
            outcome.batch1_max_abs_diff = check_batch_one(onnx_path, compressed, recipe)
            dynamic = dynamic_batch_axis(onnx_path)
        outcome.report = report
        outcome.warnings = warnings
        example = sample_inputs(None, 1, recipe.model.input_shape, seed=SEED)
        with torch.no_grad():
            reference = original(example)
            shapes_match = output_shapes(reference) == output_shapes(compressed(example))
        outcome.output_scale = max(float(tensor.abs().max()) for tensor in slimmer.cost.output_tensors(reference))

        missing = unaccounted_layers(original, compressed, report)
        problems = []
        if not shapes_match:
            problems.append("output shapes changed")
        if not dynamic:
            problems.append("an ONNX input or output has a fixed batch axis")
        if missing:
            problems.append(f"not listed as changed or skipped: {', '.join(missing)}")
        outcome.error = "; ".join(problems)
        outcome.passed = not problems
    except Exception as error:  # noqa: BLE001 - a failing model is a row of the table, not the end of the run
        outcome.error = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    outcome.seconds = time.perf_counter() - started
    gc.collect()
    return outcome


# Short labels for the reasons passes give, to count them in the table; the details keep the full text.
REASON_LABELS = (
    ("1x1 kernel", "1x1 kernel"),
    ("grouped convolution", "grouped or depthwise"),
    ("not called in a forward pass", "not called in eval mode"),
    ("used in more than one place", "shared or tied weights"),
    ("holds a parameter that another module also holds", "shared or tied weights"),
    ("its channel group includes", "group has a shared layer"),
    ("its channels reach the model output", "reaches the output"),
    ("its channel group passes through an operation", "unmodeled operation"),
    ("torch-pruning cannot map", "torch-pruning cannot map the group"),
    ("torch-pruning could not build the dependency graph", "whole graph not traceable"),
    ("torch-pruning could not trace", "bottleneck not traceable"),
    ("its channel group was already pruned", "group already pruned"),
    ("the example input never reached", "beside a path not taken"),
)


def reason_label(reason: str) -> str:
    for prefix, label in REASON_LABELS:
        if reason.startswith(prefix):
            return label
    if "below min_channels" in reason:
        return "below min_channels"
    if "below min_macs" in reason:
        return "below min_macs"
    if "keeps all" in reason:
        return "ratio keeps all channels"
    if "not fewer than" in reason:
        return "replacement not cheaper"
    return reason.split(";")[0]


def grouped_skips(report: dict[str, Any], pass_name: str) -> dict[str, list[dict[str, str]]]:
    """Skipped layers of one pass by reason label, most frequent first."""
    groups: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for skip in report.get("skipped", []):
        if skip["pass"] == pass_name:
            groups[reason_label(skip["reason"])].append(skip)
    return dict(sorted(groups.items(), key=lambda item: -len(item[1])))


def skipped_cell(report: dict[str, Any]) -> str:
    parts = []
    for pass_name in ("decompose", "prune"):
        groups = grouped_skips(report, pass_name)
        total = sum(len(skips) for skips in groups.values())
        top = ", ".join(f"{label} {len(skips)}" for label, skips in list(groups.items())[:3])
        parts.append(f"{pass_name} {total}" + (f": {top}" if top else ""))
    return "<br>".join(parts)


def table_row(outcome: Outcome) -> str:
    report = outcome.report
    result = "pass" if outcome.passed else f"FAIL: {outcome.error}"
    if not report:
        return f"| {outcome.name} | {outcome.size} | | | | | | | {result} | {outcome.seconds:.0f} |"
    original, compressed = report["original"], report["compressed"]
    passes = {entry["pass"]: entry for entry in report["passes"]}
    parity = max(report["parity"]["max_abs_diff"], outcome.batch1_max_abs_diff)
    return (f"| {outcome.name} | {outcome.size} "
            f"| {original['macs'] / 1e6:,.0f}M → {compressed['macs'] / 1e6:,.0f}M ({report['ratios']['macs']:.2f}x) "
            f"| {original['params'] / 1e6:.2f}M → {compressed['params'] / 1e6:.2f}M "
            f"| {len(passes['decompose']['changed'])} | {skipped_cell(report)} | {len(passes['prune']['changed'])} "
            f"| {parity:.1e} ({outcome.output_scale:.2g}) | {result} | {outcome.seconds:.0f} |")


TABLE_HEADER = [
    "| model | input | MACs before → after | params before → after | rewritten | skipped (most common reasons) "
    "| pruned groups | parity max abs diff (output max abs) | result | time, s |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def details_section(outcome: Outcome) -> list[str]:
    """List every reason a pass gave, with the count and up to three layer names, and the warnings slimmer logged."""
    lines = [f"### {outcome.name}", ""]
    note = MODELS[outcome.name].note
    if note:
        lines += [note, ""]
    if not outcome.report:
        return lines + [f"Failed before a report was written: {outcome.error}", ""]
    for pass_name in ("decompose", "prune"):
        for label, skips in grouped_skips(outcome.report, pass_name).items():
            names = ", ".join(f"`{skip['name']}`" for skip in skips[:3]) + (", ..." if len(skips) > 3 else "")
            lines.append(f"- {pass_name}, {len(skips)} skipped, {label}: {names}. For example: {skips[0]['reason']}")
    for message in outcome.warnings:
        lines.append(f"- warning: {message if len(message) <= 400 else message[:400] + ' ...'}")
    return lines + [""]


def coverage_page(outcomes: list[Outcome], wall_s: float) -> str:
    facts = environment()
    recipe_lines = yaml.safe_dump({**COVERAGE_RECIPE, "model": {"input_shape": [3, "SIZE", "SIZE"]}},
                                  sort_keys=False, default_flow_style=None)
    passed = sum(outcome.passed for outcome in outcomes)
    lines = [
        "# Model coverage",
        "",
        f"Recorded by `bench/coverage_zoo.py` on {datetime.date.today().isoformat()}: {passed} of "
        f"{len(outcomes)} models pass, in {wall_s / 60:.0f} minutes.",
        "",
        f"Machine: {facts['processor']}, {facts['cpu_count']} cores, torch on 1 thread, {facts['platform']}. "
        f"Versions: Python {facts['python']}, torch {facts['torch']}, torchvision {facts['torchvision']}, "
        f"torch-pruning {facts['torch_pruning']}, onnx {facts['onnx']}, onnxruntime {facts['onnxruntime']}.",
        "",
        "Each model is built by torchvision with `weights=None` and seed 0, nothing downloaded. Its batch-norm "
        "statistics are set from one batch of 8 random images, with the model in eval mode and only the batch "
        "norms training, so activations keep a unit scale. Then `slimmer.apply` runs the recipe below. Inside "
        "apply, the ONNX file must pass `onnx.checker` and onnxruntime must match PyTorch within atol 1e-4 + "
        "rtol 1e-3 on 3 random inputs at batch 3. The script then checks that the compressed model returns the "
        "same output tensors and shapes as the original, that onnxruntime matches at batch 1 too and that every "
        "ONNX input and output has a dynamic batch axis. It also checks that every convolution and every prune "
        "target is either changed or listed as skipped with its reason. A model passes when apply succeeds and "
        "all these checks hold.",
        "",
        "Random weights have flat singular-value spectra, so this page shows which layers slimmer can "
        "rewrite and prune in each architecture and that the result exports correctly, not the accuracy a "
        "trained model would keep. MACs count convolutions and linear layers, per sample.",
        "",
        "The recipe, with SIZE the input size of each model and every other setting at its default:",
        "",
        "```yaml",
        *recipe_lines.rstrip().splitlines(),
        "```",
        "",
        *TABLE_HEADER,
        *(table_row(outcome) for outcome in outcomes),
        "",
        "Rewritten: convolutions replaced by a bottleneck. Pruned groups: channel groups torch-pruning removed "
        "channels from, counting each bottleneck's two internal groups. Parity: the larger max abs difference "
        "of the batch-3 and batch-1 checks, with the largest output magnitude for scale.",
        "",
        "## What each model left alone",
        "",
    ]
    for outcome in outcomes:
        lines += details_section(outcome)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="run these models only (default: all)")
    parser.add_argument("--size", type=int, help="input image side in pixels for every model (default: per model)")
    parser.add_argument("--output", type=Path, help="page to write (default: docs/coverage.md for a full run)")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    names = arguments.models or list(MODELS)
    output = arguments.output or (COVERAGE_PAGE if not arguments.models and not arguments.size else None)
    started = time.perf_counter()
    outcomes = []
    print("\n".join(TABLE_HEADER), flush=True)
    for name in names:
        outcome = run_model(name, arguments.size)
        outcomes.append(outcome)
        print(table_row(outcome), flush=True)
    if output is not None:
        output.write_text(coverage_page(outcomes, time.perf_counter() - started), encoding="utf-8")
        print(f"Wrote {output}")
    return 0 if all(outcome.passed for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
