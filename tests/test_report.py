"""report.md: the MACs note and the Layers table."""

from __future__ import annotations

from typing import Any

from slimmer.report import MACS_NOTE, to_markdown


def layer_row(name: str, before: str, after: str, macs_before: int, macs_after: int) -> dict[str, Any]:
    return {"name": name, "before": before, "after": after, "macs_before": macs_before, "macs_after": macs_after}


def sample_report(layers: list[dict[str, Any]]) -> dict[str, Any]:
    side = {"params": 1000, "macs": 5000, "onnx_bytes": 4000, "accuracy": None, "latency_ms": {}}
    return {
        "recipe": "sample",
        "original": side,
        "compressed": {**side, "params": 800, "macs": 4000},
        "ratios": {"params": 0.8, "macs": 0.8, "onnx_bytes": 1.0, "latency_median": {}},
        "layers": layers,
        "skipped": [{"pass": "decompose", "name": "stem", "reason": "1x1 kernel; nothing to factor"}],
    }


LAYERS = [
    layer_row("stem", "conv 3->16 1x1", "conv 3->16 1x1", 1000, 1000),
    layer_row("body", "conv 16->16 3x3", "bottleneck: reduce 16->8, core 8->8 3x3, expand 8->16", 3000, 2000),
    layer_row("narrowed", "conv 16->16 1x1", "conv 12->16 1x1", 1000, 750),
    layer_row("same_macs", "linear 16->10", "linear 16->10", 160, 160),
]


def layers_section(markdown: str) -> str:
    return markdown.split("## Layers", 1)[1].split("## Skipped", 1)[0]


def test_macs_note_once() -> None:
    assert to_markdown(sample_report(LAYERS)).count(MACS_NOTE) == 1


def test_layers_table_lists_changed_only() -> None:
    section = layers_section(to_markdown(sample_report(LAYERS)))

    assert "| body " in section
    assert "| narrowed " in section
    assert "| stem " not in section
    assert "| same_macs " not in section
    assert "2 of 4 counted layers changed; report.json lists the 2 unchanged ones too." in section


def test_layers_none_changed() -> None:
    section = layers_section(to_markdown(sample_report(LAYERS[:1])))

    assert "No layer changed (1 counted layers)." in section
    assert "|" not in section


def test_skipped_layer_still_listed() -> None:
    markdown = to_markdown(sample_report(LAYERS))

    assert "| decompose | stem  | 1x1 kernel; nothing to factor |" in markdown
