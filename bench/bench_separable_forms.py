"""Time the onnxruntime forms of a depthwise convolution with channel multiplier K, against a dense 3x3.

    python bench/bench_separable_forms.py

Three forms compute the same depthwise-then-pointwise function:
- multiplier: one ``Conv2d(C, C*K, groups=C)``;
- tiled: the input concatenated K times along channels, then ``Conv2d(C*K, C*K, groups=C*K)``
  (what slimmer emits);
- split: K depthwise convolutions with multiplier 1, concatenated.
Each model is a stack of 6 such layers with ReLU, at the CIFAR ResNet stage shapes, timed at
1 thread with the models interleaved. Ratios are median latency over the dense 3x3 stack's.
"""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

SHAPES = [(16, 32), (32, 16), (64, 8)]
MULTIPLIERS = [1, 2, 3, 4]
LAYERS = 6


class Tiled(nn.Module):
    def __init__(self, channels: int, multiplier: int):
        super().__init__()
        self.multiplier = multiplier
        self.depthwise = nn.Conv2d(channels * multiplier, channels * multiplier, 3, padding=1,
                                   groups=channels * multiplier, bias=False)
        self.pointwise = nn.Conv2d(channels * multiplier, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(torch.cat([x] * self.multiplier, dim=1)))


class Split(nn.Module):
    def __init__(self, channels: int, multiplier: int):
        super().__init__()
        self.depthwise = nn.ModuleList(
            [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False) for _ in range(multiplier)])
        self.pointwise = nn.Conv2d(channels * multiplier, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(torch.cat([layer(x) for layer in self.depthwise], dim=1))


def multiplier_form(channels: int, multiplier: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels * multiplier, 3, padding=1, groups=channels, bias=False),
                         nn.Conv2d(channels * multiplier, channels, 1, bias=False))


def stack(build) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(build(), nn.ReLU()) for _ in range(LAYERS)]).eval()


def session(model: nn.Module, channels: int, size: int) -> ort.InferenceSession:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, channels, size, size),), buffer, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def measure(runs_batch1: int = 40, runs_batch32: int = 10) -> list[dict]:
    """Return one row per (shape, K, batch) with the median latency ratio of each form to the dense stack."""
    rows = []
    for channels, size in SHAPES:
        for multiplier in MULTIPLIERS:
            forms = {"dense": stack(lambda: nn.Conv2d(channels, channels, 3, padding=1, bias=False)),
                     "multiplier": stack(lambda: multiplier_form(channels, multiplier))}
            if multiplier > 1:
                forms["tiled"] = stack(lambda: Tiled(channels, multiplier))
                forms["split"] = stack(lambda: Split(channels, multiplier))
            sessions = {name: session(model, channels, size) for name, model in forms.items()}
            for batch, runs in ((1, runs_batch1), (32, runs_batch32)):
                feed = {"x": np.random.default_rng(0).standard_normal((batch, channels, size, size)).astype(np.float32)}
                timings: dict[str, list[float]] = {name: [] for name in sessions}
                for current in sessions.values():
                    for _ in range(3):
                        current.run(None, feed)
                for _ in range(runs):
                    for name, current in sessions.items():
                        start = time.perf_counter()
                        current.run(None, feed)
                        timings[name].append(time.perf_counter() - start)
                dense = float(np.median(timings["dense"]))
                row = {"channels": channels, "size": size, "k": multiplier, "batch": batch, "dense_ms": dense * 1000.0}
                for name in ("multiplier", "tiled", "split"):
                    row[name] = float(np.median(timings[name])) / dense if name in timings else None
                rows.append(row)
                print(row, flush=True)
    return rows


def markdown(rows: list[dict]) -> list[str]:
    lines = ["| channels x size | K | batch | dense 3x3 stack, ms | multiplier | tiled | split |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [f"{row[name]:.2f}x" if row[name] is not None else "" for name in ("multiplier", "tiled", "split")]
        lines.append(f"| {row['channels']} x {row['size']}x{row['size']} | {row['k']} | {row['batch']} | "
                     f"{row['dense_ms']:.3f} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(markdown(measure())))
