"""Measured onnxruntime latency of single layers, cached on disk per machine.

A latency budget needs the cost of every option of every layer. Each distinct layer (its
structure, input shape, batch size and thread count) is exported alone to ONNX and timed once.
The median goes into a JSON file keyed by the processor and the onnxruntime version, so later
runs on the same machine reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimmer.cost import measure_latency
from slimmer.layers import REPLACEMENT_FORMS

logger = logging.getLogger(__name__)

LAYER_WARMUP = 5
LAYER_RUNS = 30


def default_cache_file() -> Path:
    folder = Path(os.environ.get("SLIMMER_CACHE_DIR", Path.home() / ".cache" / "slimmer"))
    return folder / "latency.json"


def machine_key() -> str:
    import onnxruntime

    from slimmer.report import processor_name

    return f"{processor_name()} | {os.cpu_count()} cpus | onnxruntime {onnxruntime.__version__}"


def describe_module(module: nn.Module) -> dict[str, Any]:
    """Structure of a convolution or replacement module, enough to tell two layers apart."""
    if isinstance(module, tuple(REPLACEMENT_FORMS.values())):
        return module.spec()
    if isinstance(module, nn.Conv2d):
        return {"form": "conv", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "padding_mode": module.padding_mode,
                "bias": module.bias is not None}
    raise TypeError(f"no latency description for {type(module).__name__}")


class LatencyTable:
    """Median latency in ms of single modules at ``batch_size`` and ``threads``, cached in ``cache_file``."""

    def __init__(self, batch_size: int, threads: int, cache_file: Path | None = None):
        self.batch_size = batch_size
        self.threads = threads
        self.cache_file = Path(cache_file) if cache_file is not None else default_cache_file()
        self.machine = machine_key()
        self.entries: dict[str, float] = self._read()
        self.measured = 0

    def _read(self) -> dict[str, float]:
        try:
            content = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("Ignoring the unreadable latency cache %s (%s)", self.cache_file, error)
            return {}
        entries = content.get(self.machine, {}) if isinstance(content, dict) else {}
        return {key: float(value) for key, value in entries.items() if isinstance(value, (int, float))}

    def save(self) -> None:
        """Merge this table into the cache file, written to a temporary file and renamed into place."""
        try:
            content = json.loads(self.cache_file.read_text(encoding="utf-8"))
            if not isinstance(content, dict):
                content = {}
        except (OSError, ValueError):
            content = {}
        content[self.machine] = {**content.get(self.machine, {}), **self.entries}
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".latency-", dir=self.cache_file.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(content, stream, indent=1, sort_keys=True)
        os.replace(temporary, self.cache_file)

    def key(self, module: nn.Module, input_shape: tuple[int, ...]) -> str:
        description = json.dumps({"module": describe_module(module), "input": list(input_shape),
                                  "batch": self.batch_size, "threads": self.threads}, sort_keys=True)
        return hashlib.sha256(description.encode()).hexdigest()[:24]

    def latency_ms(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        """Median latency of ``module`` on inputs ``(batch_size, *input_shape)``, measured once per machine."""
        key = self.key(module, input_shape)
        if key not in self.entries:
            self.entries[key] = self._measure(module, input_shape)
            self.measured += 1
        return self.entries[key]

    def _measure(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        from slimmer.export import export_onnx

        example = torch.zeros((1, *input_shape))
        with tempfile.TemporaryDirectory(prefix="slimmer-latency-") as folder:
            path = export_onnx(module.eval(), example, Path(folder) / "layer.onnx", opset=17)
            timings = measure_latency({"layer": path}, list(input_shape), [self.batch_size], self.threads,
                                      LAYER_WARMUP, LAYER_RUNS)
        return timings["layer"][self.batch_size]["median"]
