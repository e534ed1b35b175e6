"""Before/after cost report: report.json for tools, report.md and a printed table for people."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from torch import nn

from slimmer.graph import get_module
from slimmer.layers import SeparableConv, TuckerBottleneck

MACS_NOTE = ("One MAC is one multiply-add, per sample (batch size 1). Counted: convolutions and linear layers; "
             "normalization, activations, pooling and additions are not counted.")


def environment() -> dict[str, Any]:
    """Versions and machine facts a measured number depends on."""
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "slimmer": version("slimmer"),
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "torch_pruning": version("torch-pruning"),
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime"),
        "platform": platform.platform(),
        "processor": processor_name(),
        "cpu_count": __import__("os").cpu_count(),
    }


def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_layer(model: nn.Module, name: str) -> str:
    try:
        module = get_module(model, name)
    except AttributeError:
        return "removed"
    if isinstance(module, TuckerBottleneck):
        parts = [f"reduce {module.in_channels}->{module.rank_in}"] if hasattr(module, "reduce") else []
        kernel = "x".join(map(str, module.core.kernel_size))
        parts.append(f"core {module.core.in_channels}->{module.core.out_channels} {kernel}")
        if hasattr(module, "expand"):
            parts.append(f"expand {module.rank_out}->{module.out_channels}")
        return "bottleneck: " + ", ".join(parts)
    if isinstance(module, SeparableConv):
        kernel = "x".join(map(str, module.depthwise.kernel_size))
        return (f"separable: depthwise {module.in_channels}x{module.multiplier} {kernel}, "
                f"pointwise {module.pointwise.in_channels}->{module.out_channels}")
    if isinstance(module, nn.Conv2d):
        kernel = "x".join(map(str, module.kernel_size))
        groups = f" groups={module.groups}" if module.groups != 1 else ""
        return f"conv {module.in_channels}->{module.out_channels} {kernel}{groups}"
    if isinstance(module, nn.Linear):
        return f"linear {module.in_features}->{module.out_features}"
    return type(module).__name__


def layer_table(original: nn.Module, compressed: nn.Module, original_macs: dict[str, int],
                compressed_macs: dict[str, int]) -> list[dict[str, Any]]:
    """Build one row per counted layer of the original model: what it became, and its MACs before and after."""
    rows = []
    for name, before_macs in original_macs.items():
        after_macs = sum(macs for key, macs in compressed_macs.items() if key == name or key.startswith(name + "."))
        module = get_module(compressed, name) if _exists(compressed, name) else None
        row: dict[str, Any] = {
            "name": name,
            "before": describe_layer(original, name),
            "after": describe_layer(compressed, name),
            "macs_before": before_macs,
            "macs_after": after_macs,
        }
        if isinstance(module, TuckerBottleneck):
            row["rank_in"] = module.rank_in
            row["rank_out"] = module.rank_out
        rows.append(row)
    return rows


def _exists(model: nn.Module, name: str) -> bool:
    try:
        get_module(model, name)
        return True
    except AttributeError:
        return False


def _ratio(after: float | None, before: float | None) -> float | None:
    if after is None or not before:
        return None
    return after / before


def summary_ratios(report: dict[str, Any]) -> dict[str, Any]:
    original, compressed = report["original"], report["compressed"]
    latency = {}
    for batch, timing in compressed.get("latency_ms", {}).items():
        base = original["latency_ms"].get(batch)
        latency[batch] = _ratio(timing["median"], base["median"] if base else None)
    return {
        "params": _ratio(compressed["params"], original["params"]),
        "macs": _ratio(compressed["macs"], original["macs"]),
        "onnx_bytes": _ratio(compressed["onnx_bytes"], original["onnx_bytes"]),
        "latency_median": latency,
    }


def achieved_share(plan: dict[str, Any], report: dict[str, Any]) -> float | None:
    """Share of the original cost that the compressed model reached, in the plan's metric.

    A latency share comes from the report's own measurement when it ran at the plan's batch size
    and thread count, else from the plan's last measurement of the whole model.
    """
    metric = plan["metric"]
    if metric in ("macs", "params"):
        return report["ratios"].get(metric)
    protocol = report.get("latency_protocol", {})
    batch = str(plan.get("batch_size"))
    if protocol.get("threads") == plan.get("threads") and batch in report["ratios"].get("latency_median", {}):
        return report["ratios"]["latency_median"][batch]
    return plan.get("measured")


def plan_lines(report: dict[str, Any]) -> list[str]:
    """Format the report.md sections on planned budgets and per-layer sensitivity."""
    lines: list[str] = []
    for plan in report.get("plan", []):
        achieved = plan.get("achieved")
        reached = "n/a" if achieved is None else f"{achieved:.3f}"
        if plan["metric"] == "latency" and plan.get("measured") is not None:
            reached += (f" in this report's measurement ({plan['measured']:.3f} in the planner's last "
                        "measurement of the whole model)")
        lines += ["", "## Plan", "",
                  f"Target {plan['metric']} {plan['target']:g} of the original; the plan expected "
                  f"{plan['planned']:.3f} and the compressed model reached {reached}. Smallest reachable: "
                  f"{plan['smallest_reachable']:.3f}. Errors measured on {plan['calibration']}; planning took "
                  f"{plan['seconds']:.1f} s."]
        for index, round_ in enumerate(plan.get("rounds", [])):
            lines.append(f"- latency round {index + 1}: budget {round_['budget']:.3f}, planned "
                         f"{round_['planned']:.3f}, measured {round_['measured']:.3f}")
    rows = []
    for layer in report.get("sensitivity", []):
        hull = layer["hull"]
        position = next(index for index, option in enumerate(hull) if option["option"] == layer["chosen"])
        cheaper = hull[position + 1] if position + 1 < len(hull) else None
        dearer = hull[position - 1] if position > 0 else None
        rows.append((layer["name"], layer["chosen"], f"{layer['error']:.4f}", f"{layer.get('output_weight', 1.0):.3g}",
                     _describe_neighbour(dearer), _describe_neighbour(cheaper)))
    if rows:
        lines += ["", "## Sensitivity", "",
                  "Relative output error `E||y - ŷ||² / E||y||²` of each layer's planned option and of its "
                  "neighbours on the (cost, error) hull. The output weight is the model output error per unit "
                  "of the layer's error; the planner minimizes the sum of weighted errors. sensitivity.json "
                  "lists every option.", ""]
        lines += _table(("layer", "planned", "error", "output weight", "next dearer option", "next cheaper option"),
                        rows)
    return lines


def _describe_neighbour(option: dict[str, Any] | None) -> str:
    if option is None:
        return ""
    return f"{option['option']}: error {option['error']:.4f}, {_format_number(option['macs'])} MACs"


def _format_number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value / 1e6:.3f} M"
    return str(value)


def _format_megabytes(size_bytes: int | None) -> str:
    return "n/a" if size_bytes is None else f"{size_bytes / 1e6:.2f} MB"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    original, compressed, ratios = report["original"], report["compressed"], report["ratios"]
    rows = [
        ("params", _format_number(original["params"]), _format_number(compressed["params"]), _format_number(ratios["params"])),
        ("MACs", _format_number(original["macs"]), _format_number(compressed["macs"]), _format_number(ratios["macs"])),
        ("ONNX size", _format_megabytes(original["onnx_bytes"]), _format_megabytes(compressed["onnx_bytes"]),
         _format_number(ratios["onnx_bytes"])),
    ]
    threads = report.get("latency_protocol", {}).get("threads")
    for batch, timing in compressed.get("latency_ms", {}).items():
        base = original["latency_ms"][batch]
        rows.append((f"latency ms, batch {batch}, {threads} thread(s), median",
                     f"{base['median']:.3f}", f"{timing['median']:.3f}", _format_number(ratios["latency_median"][batch])))
        rows.append((f"latency ms, batch {batch}, {threads} thread(s), p90", f"{base['p90']:.3f}", f"{timing['p90']:.3f}", ""))
    accuracy_before, accuracy_after = original.get("accuracy"), compressed.get("accuracy")
    delta = f"{accuracy_after - accuracy_before:+.2f} pts" if accuracy_before is not None and accuracy_after is not None else ""
    rows.append(("top-1 %", _format_number(accuracy_before), _format_number(accuracy_after), delta))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(row[index])) for row in [header, *rows]) for index in range(len(header))]
    lines = ["| " + " | ".join(str(cell).ljust(width) for cell, width in zip(header, widths)) + " |",
             "| " + " | ".join("-" * width for width in widths) + " |"]
    lines += ["| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    return lines


def format_summary(report: dict[str, Any]) -> str:
    return "\n".join(_table(("metric", "original", "compressed", "ratio"), summary_rows(report)))


def layer_changed(row: dict[str, Any]) -> bool:
    """Tell whether a row of :func:`layer_table` describes a layer that the steps rewrote, narrowed or made cheaper."""
    return row["before"] != row["after"] or row["macs_before"] != row["macs_after"]


def layer_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Build the report.md Layers section: a table of the changed layers and a count of the unchanged ones."""
    changed = [row for row in rows if layer_changed(row)]
    lines = ["## Layers", ""]
    unchanged = len(rows) - len(changed)
    if not changed:
        return lines + [f"No layer changed ({unchanged} counted layers)."]
    header: tuple[str, ...] = ("layer", "before", "after", "MACs before", "MACs after")
    table_rows: list[tuple[str, ...]] = [
        (row["name"], row["before"], row["after"], _format_number(row["macs_before"]), _format_number(row["macs_after"]))
        for row in changed]
    if any("reason" in row for row in changed):
        header += ("why",)
        table_rows = [cells + (row.get("reason", ""),) for cells, row in zip(table_rows, changed)]
    if unchanged:
        lines += [f"{len(changed)} of {len(rows)} counted layers changed; report.json lists the {unchanged} "
                  "unchanged ones too.", ""]
    return lines + _table(header, table_rows)


def to_markdown(report: dict[str, Any]) -> str:
    parity = report.get("parity") or {}
    lines = [f"# slimmer report: {report.get('recipe', 'recipe')}", "", format_summary(report), ""]
    if parity:
        lines += [f"ONNX parity on {parity['samples']} inputs: max abs diff {parity['max_abs_diff']:.3g}, "
                  f"max rel diff {parity['max_rel_diff']:.3g} (tolerance atol={parity['atol']}, rtol={parity['rtol']}): "
                  f"{'passed' if parity['passed'] else 'FAILED'}.", ""]
    protocol = report.get("latency_protocol")
    if protocol:
        lines += [f"Latency: onnxruntime {protocol['provider']}, graph optimization {protocol['optimization']}, "
                  f"{protocol['threads']} thread(s), {protocol['warmup']} warm-up runs then {protocol['runs']} timed runs, "
                  "original and compressed interleaved.", ""]
    lines += [MACS_NOTE, ""]
    lines += layer_lines(report["layers"])
    lines += plan_lines(report)
    if report.get("skipped"):
        lines += ["", "## Skipped", ""]
        lines += _table(("pass", "layer", "reason"), [(row["pass"], row["name"], row["reason"]) for row in report["skipped"]])
    environment_info = report.get("environment", {})
    if environment_info:
        lines += ["", "## Environment", ""]
        lines += [f"- {key}: {value}" for key, value in environment_info.items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], folder: Path) -> None:
    """Write report.json and report.md, and sensitivity.json when the run planned a budget."""
    summary = {key: value for key, value in report.items() if key != "sensitivity"}
    (folder / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    if report.get("sensitivity"):
        (folder / "sensitivity.json").write_text(json.dumps(report["sensitivity"], indent=1) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
