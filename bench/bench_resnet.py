"""Reproduce the CIFAR ResNet results: run the shipped recipes and record the numbers in docs/results.md.

    python bench/bench_resnet.py                 # every recipe below, then the depthwise form timings
    python bench/bench_resnet.py --only resnet20 # one recipe

Each run is a real `slimmer apply` on the checkpoints in ../shared/models and the images in
../shared/data. The targets checked for the ResNet-56 half-MACs recipe: MACs at most 0.5x,
onnxruntime latency at most 0.7x at batch 1 and 0.6x at batch 32 (1 thread), top-1 at most
2.5 points below the original. The planned recipes and bench/bench_plan.py are checked against
the budget-planning targets listed in their section. Exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
SHARED = REPOSITORY.parent / "shared"
RESULTS_PAGE = REPOSITORY / "docs" / "results.md"
OUTPUT_ROOT = REPOSITORY / "bench" / "out"

RUNS = {
    "resnet56": ("recipes/resnet56-half-macs.yaml", SHARED / "models" / "resnet56-cifar10-jpeg.th"),
    "resnet56-separable": ("recipes/resnet56-separable.yaml", SHARED / "models" / "resnet56-cifar10-jpeg.th"),
    "resnet56-auto": ("recipes/resnet56-auto.yaml", SHARED / "models" / "resnet56-cifar10-jpeg.th"),
    "resnet20": ("recipes/resnet20-half-macs.yaml", SHARED / "models" / "resnet20-cifar10-jpeg.th"),
    "resnet56-target-macs": ("recipes/resnet56-target-macs.yaml", SHARED / "models" / "resnet56-cifar10-jpeg.th"),
    "resnet56-target-latency": ("recipes/resnet56-target-latency.yaml",
                                SHARED / "models" / "resnet56-cifar10-jpeg.th"),
}
FORMS = ("resnet56", "resnet56-separable", "resnet56-auto")
TARGETS = {"macs": 0.5, "latency_batch_1": 0.7, "latency_batch_32": 0.6, "accuracy_drop_points": 2.5}


def run_recipe(name: str, reuse: bool = False) -> tuple[dict, float]:
    """Run one recipe, or with ``reuse`` read the report an earlier run left in bench/out.

    Returns the report and the run time of ``slimmer.apply`` in seconds, as the report records it
    (model loading and interpreter start-up excluded).
    """
    recipe, model = RUNS[name]
    output = OUTPUT_ROOT / name
    if not (reuse and (output / "report.json").is_file()):
        command = [sys.executable, "-m", "slimmer.cli", "apply", recipe, str(model), "-o", str(output), "--force"]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, cwd=REPOSITORY, check=True)
    report = json.loads((output / "report.json").read_text())
    return report, report["timings_s"]["total"]


def check_targets(report: dict) -> dict[str, tuple[float, float, bool]]:
    """Compare a report with the half-MACs targets; return ``{target: (measured, limit, met)}``."""
    ratios = report["ratios"]
    drop = report["original"]["accuracy"] - report["compressed"]["accuracy"]
    measured = {
        "macs": ratios["macs"],
        "latency_batch_1": ratios["latency_median"]["1"],
        "latency_batch_32": ratios["latency_median"]["32"],
        "accuracy_drop_points": drop,
    }
    return {key: (value, TARGETS[key], value <= TARGETS[key]) for key, value in measured.items()}


def results_section(name: str, report: dict, wall_s: float, with_targets: bool) -> list[str]:
    original, compressed = report["original"], report["compressed"]
    lines = [f"## {name}: `{RUNS[name][0]}`", "",
             "| metric | original | compressed | ratio or change | target | met |",
             "| --- | --- | --- | --- | --- | --- |"]
    checks = check_targets(report)

    def row(label: str, before: str, after: str, change: str, key: str | None) -> None:
        if key and with_targets:
            value, limit, met = checks[key]
            lines.append(f"| {label} | {before} | {after} | {change} | <= {limit} | {'yes' if met else 'NO'} |")
        else:
            lines.append(f"| {label} | {before} | {after} | {change} | | |")

    row("params", f"{original['params']:,}", f"{compressed['params']:,}", f"{report['ratios']['params']:.3f}x", None)
    row("MACs per sample", f"{original['macs']:,}", f"{compressed['macs']:,}", f"{report['ratios']['macs']:.3f}x", "macs")
    row("ONNX size, bytes", f"{original['onnx_bytes']:,}", f"{compressed['onnx_bytes']:,}",
        f"{report['ratios']['onnx_bytes']:.3f}x", None)
    for batch in ("1", "32"):
        before, after = original["latency_ms"][batch], compressed["latency_ms"][batch]
        row(f"latency batch {batch}, median ms (p90)", f"{before['median']:.3f} ({before['p90']:.3f})",
            f"{after['median']:.3f} ({after['p90']:.3f})", f"{report['ratios']['latency_median'][batch]:.3f}x",
            f"latency_batch_{batch}")
    row("top-1 on val (5,000 images), %", f"{original['accuracy']:.2f}", f"{compressed['accuracy']:.2f}",
        f"{compressed['accuracy'] - original['accuracy']:+.2f} pts", "accuracy_drop_points")
    parity = report["parity"]
    timings = report["timings_s"]
    lines += ["", f"ONNX parity on {parity['samples']} validation images: max abs diff {parity['max_abs_diff']:.2e}, "
              f"max rel diff {parity['max_rel_diff']:.2e} (atol {parity['atol']}, rtol {parity['rtol']}).",
              f"Run time of slimmer.apply: {wall_s:.0f} s; steps: "
              + ", ".join(f"{key} {value:.1f} s" for key, value in timings.items() if key.startswith("steps")) + ".", ""]
    return lines


def forms_comparison(reports: dict[str, tuple[dict, float]]) -> list[str]:
    """Compare the ResNet-56 recipes of each form, all with the same refit and fine-tune budget."""
    present = [name for name in FORMS if name in reports]
    if len(present) < 2:
        return []
    lines = ["## ResNet-56: bottleneck, separable and auto forms", "",
             "Same refit (256 images) and fine-tune (2 epochs, SGD, distillation) in each recipe.", "",
             "| recipe | forms chosen | MACs | latency batch 1 | latency batch 32 | top-1 % | change | run time, s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in present:
        report, wall_s = reports[name]
        decompose_passes = [entry for entry in report["passes"] if entry["pass"] == "decompose"]
        counts: dict[str, int] = {}
        for entry in decompose_passes:
            for change in entry["changed"]:
                counts[change["details"]["form"]] = counts.get(change["details"]["form"], 0) + 1
        forms = ", ".join(f"{form} {count}" for form, count in sorted(counts.items()))
        ratios = report["ratios"]
        change = report["compressed"]["accuracy"] - report["original"]["accuracy"]
        lines.append(f"| `{RUNS[name][0]}` | {forms} | {ratios['macs']:.3f}x | {ratios['latency_median']['1']:.3f}x | "
                     f"{ratios['latency_median']['32']:.3f}x | {report['compressed']['accuracy']:.2f} | "
                     f"{change:+.2f} pts | {wall_s:.0f} |")
    return lines + [""]


def planning_section(reports: dict[str, tuple[dict, float]], reuse: bool) -> tuple[list[str], bool]:
    """Record the planned recipes and the before-fine-tuning comparisons; return the lines and whether all met."""
    import bench_plan

    if not (reuse and bench_plan.OUTPUT.is_file()):
        print(f"$ {sys.executable} bench/bench_plan.py", flush=True)
        subprocess.run([sys.executable, str(REPOSITORY / "bench" / "bench_plan.py")], cwd=REPOSITORY, check=True)
    comparison = json.loads(bench_plan.OUTPUT.read_text())
    original = comparison["original_top1"]
    variants = comparison["variants"]
    planned = variants[0]
    checks: list[tuple[str, str, bool]] = []
    lines = ["## Budget planning on ResNet-56", "",
             "`bench/bench_plan.py`: every 3x3 convolution of the residual stages replaced, bottleneck ranks "
             f"multiples of 8, measured before any fine-tuning at the MACs of a 0.5 target. {comparison['calibration_images']} calibration "
             f"images; original top-1 {original:.2f}%. The uniform allocation uses rank ratio "
             f"{comparison['uniform_ratio']} in every layer, the ratio whose MACs come closest to the planned ones.", "",
             "| allocation and initialization | MACs | top-1 after init, % | top-1 after refit, % | refit time, s |",
             "| --- | --- | --- | --- | --- |"]
    for row in variants:
        lines.append(f"| {row['variant']} | {row['macs_ratio']:.3f}x | {row['top1_init']:.2f} | "
                     f"{row['top1_refit']:.2f} | {row['refit_s']:.1f} |")
    best_uniform = max((row for row in variants if row["variant"].startswith("uniform")),
                       key=lambda row: row["top1_refit"])
    bottlenecks = next(row for row in variants if row["variant"].startswith("planned, bottlenecks only"))
    gap = bottlenecks["top1_refit"] - best_uniform["top1_refit"]
    lines += ["", "Ranks are multiples of 8, so the uniform ratio closest to the plan's MACs has "
              f"{best_uniform['macs_ratio'] / planned['macs_ratio'] - 1:+.0%} MACs against the plan. With "
              f"bottlenecks only, the plan reaches {bottlenecks['top1_refit']:.2f}% after refit against the best "
              f"uniform {best_uniform['top1_refit']:.2f}% ({gap:+.2f} points; two draws of calibration images "
              "moved a plan by up to 2 points, docs/experiments.md)."]
    checks.append(("planned forms and ranks beat the best uniform ratio before fine-tuning (after refit)",
                   f"{planned['top1_refit']:.2f} vs {best_uniform['top1_refit']:.2f}",
                   planned["top1_refit"] > best_uniform["top1_refit"]))
    checks.append(("refit beats no refit (planned)", f"{planned['top1_refit']:.2f} vs {planned['top1_init']:.2f}",
                   planned["top1_refit"] > planned["top1_init"]))
    checks.append(("planned top-1 before fine-tuning at most 5 points below the original",
                   f"{planned['top1_refit'] - original:+.2f} pts", original - planned["top1_refit"] <= 5.0))

    if "resnet56-target-macs" in reports:
        report, _ = reports["resnet56-target-macs"]
        ratio = report["ratios"]["macs"]
        drop = report["original"]["accuracy"] - report["compressed"]["accuracy"]
        timings = report["timings_s"]
        plan_and_refit = timings["steps[0].decompose"] + timings["steps[1].refit"]
        checks.append(("`resnet56-target-macs`: MACs within 3% of 0.5", f"{ratio:.3f}x", abs(ratio / 0.5 - 1) <= 0.03))
        checks.append(("`resnet56-target-macs`: top-1 after 1 epoch at most 1.0 point below the original",
                       f"{-drop:+.2f} pts", drop <= 1.0))
        checks.append(("`resnet56-target-macs`: planning and refit under 2 minutes", f"{plan_and_refit:.1f} s",
                       plan_and_refit < 120))
    if "resnet56-target-latency" in reports:
        report, _ = reports["resnet56-target-latency"]
        ratio = report["ratios"]["latency_median"]["32"]
        checks.append(("`resnet56-target-latency`: fresh latency at batch 32 at most 0.6x", f"{ratio:.3f}x",
                       ratio <= 0.6))
    lines += ["", "| check | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {label} | {value} | {'yes' if met else 'NO'} |" for label, value, met in checks]
    return lines + [""], all(met for _, _, met in checks)


def forms_section() -> list[str]:
    from bench_separable_forms import markdown, measure

    return ["## onnxruntime forms of a depthwise convolution with channel multiplier K", "",
            "Measured by `bench/bench_separable_forms.py`: stacks of 6 layers, 1 thread, median latency over a dense "
            "3x3 stack of the same shape. slimmer emits the tiled form.", "", *markdown(measure()), ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RUNS), action="append", help="run only these recipes")
    parser.add_argument("--skip-forms", action="store_true", help="do not time the depthwise forms")
    parser.add_argument("--skip-planning", action="store_true", help="do not run the planning comparison")
    parser.add_argument("--reuse", action="store_true",
                        help="read the reports of earlier runs in bench/out instead of running the recipes again")
    arguments = parser.parse_args()

    names = arguments.only or list(RUNS)
    reports = {name: run_recipe(name, arguments.reuse) for name in names}
    environment = next(iter(reports.values()))[0]["environment"]
    protocol = next(iter(reports.values()))[0]["latency_protocol"]

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    lines = ["# Results", "",
             f"Recorded by `bench/bench_resnet.py` on {datetime.date.today().isoformat()}.", "",
             f"Machine: {environment['processor']}, {environment['cpu_count']} cores, {environment['platform']}. "
             f"Versions: Python {environment['python']}, torch {environment['torch']}, torch-pruning "
             f"{environment['torch_pruning']}, torchvision {environment['torchvision']}, onnx {environment['onnx']}, onnxruntime {environment['onnxruntime']}.", "",
             f"Latency: onnxruntime {protocol['provider']}, {protocol['optimization']}, {protocol['threads']} thread, "
             f"{protocol['warmup']} warm-up runs then {protocol['runs']} timed runs per batch size, original and "
             "compressed interleaved. MACs count convolutions and linear layers, one multiply-add each, per sample.", "",
             "The targets apply to the ResNet-56 half-MACs recipe (MACs, latency, accuracy) and to auto, which must "
             "come within 0.5 points of the better pure form. The other recipes are recorded for comparison.", ""]
    failed = False
    for name, (report, wall_s) in reports.items():
        lines += results_section(name, report, wall_s, with_targets=name == "resnet56")
        if name == "resnet56":
            failed |= not all(met for _, _, met in check_targets(report).values())
        if name == "resnet56-auto" and "resnet56" in reports and "resnet56-separable" in reports:
            best = max(reports[other][0]["compressed"]["accuracy"] for other in ("resnet56", "resnet56-separable"))
            failed |= report["compressed"]["accuracy"] < best - 0.5
    lines += forms_comparison(reports)
    if not arguments.skip_planning:
        planning_lines, planning_met = planning_section(reports, arguments.reuse)
        lines += planning_lines
        failed |= not planning_met
    if not arguments.skip_forms:
        lines += forms_section()
    RESULTS_PAGE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PAGE.write_text("\n".join(lines), encoding="utf-8")
    print(f"Wrote {RESULTS_PAGE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
