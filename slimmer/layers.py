"""Modules that slimmer's rewrites put into a model.

They are plain ``nn.Sequential`` containers of ``nn.Conv2d`` layers, so that torch-pruning,
ONNX export and onnxruntime see nothing but standard convolutions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _spatial_settings(conv: nn.Conv2d) -> dict[str, Any]:
    """Kernel size, stride, padding, dilation and padding mode of ``conv``, as lists for YAML and JSON."""
    return {
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
        "dilation": list(conv.dilation),
        "padding_mode": conv.padding_mode,
    }


def _arguments_from_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Turn a ``spec()`` dictionary (lists, as YAML and JSON store them) back into constructor arguments."""
    arguments = {key: value for key, value in spec.items() if key != "form"}
    for key in ("kernel_size", "stride", "dilation"):
        arguments[key] = tuple(arguments[key])
    if not isinstance(arguments["padding"], str):
        arguments["padding"] = tuple(arguments["padding"])
    return arguments


class TuckerBottleneck(nn.Sequential):
    """Tucker-2 bottleneck: 1x1 reduce ``I -> r_in``, k x k core ``r_in -> r_out``, 1x1 expand ``r_out -> O``.

    The core alone keeps stride, padding, dilation and padding_mode; the expand carries the bias.
    A factor whose rank equals the full channel count is folded into the core and left out, so a
    bottleneck has two or three layers. Input ``(N, I, H, W)``, output ``(N, O, H', W')`` as the
    replaced convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank_in: int,
        rank_out: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: Any = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        padding_mode: str = "zeros",
        bias: bool = False,
        keep_full_rank_factors: bool = False,
    ):
        super().__init__()
        has_reduce = keep_full_rank_factors or rank_in < in_channels
        has_expand = keep_full_rank_factors or rank_out < out_channels
        core_in = rank_in if has_reduce else in_channels
        core_out = rank_out if has_expand else out_channels

        if has_reduce:
            self.add_module("reduce", nn.Conv2d(in_channels, rank_in, 1, bias=False))
        self.add_module(
            "core",
            nn.Conv2d(
                core_in, core_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
                padding_mode=padding_mode, bias=bias and not has_expand,
            ),
        )
        if has_expand:
            self.add_module("expand", nn.Conv2d(rank_out, out_channels, 1, bias=bias))

    @property
    def rank_in(self) -> int:
        return self.core.in_channels

    @property
    def rank_out(self) -> int:
        return self.core.out_channels

    @property
    def in_channels(self) -> int:
        first = self.reduce if hasattr(self, "reduce") else self.core
        return first.in_channels

    @property
    def out_channels(self) -> int:
        last = self.expand if hasattr(self, "expand") else self.core
        return last.out_channels

    def spec(self) -> dict[str, Any]:
        """Describe the structure, enough to rebuild the module before loading its state_dict."""
        core = self.core
        return {
            "form": "bottleneck",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "rank_in": self.rank_in,
            "rank_out": self.rank_out,
            **_spatial_settings(core),
            "bias": any(layer.bias is not None for layer in self),
            "keep_full_rank_factors": hasattr(self, "reduce") and hasattr(self, "expand")
            and (self.rank_in == self.in_channels or self.rank_out == self.out_channels),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TuckerBottleneck:
        return cls(**_arguments_from_spec(spec))


class SeparableConv(nn.Module):
    """Depthwise k x k with channel multiplier K, then pointwise 1x1 ``I*K -> O``.

    The input is tiled K times along channels (``[x, x, ..., x]``, channel ``k*I + i`` is ``x_i``)
    and a depthwise convolution with multiplier 1 runs on the ``I*K`` channels. This computes the
    same function as ``Conv2d(I, I*K, groups=I)`` with its channels reordered, and onnxruntime 1.32
    runs it 2 to 3 times faster, because its depthwise kernel takes multiplier 1 only (measured by
    bench/bench_separable_forms.py). The depthwise layer keeps stride, padding, dilation and
    padding_mode; the pointwise one carries the bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        multiplier: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: Any = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        padding_mode: str = "zeros",
        bias: bool = False,
    ):
        super().__init__()
        self.multiplier = multiplier
        channels = in_channels * multiplier
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=channels, padding_mode=padding_mode, bias=False)
        self.pointwise = nn.Conv2d(channels, out_channels, 1, bias=bias)

    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels // self.multiplier

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier > 1:
            x = torch.cat([x] * self.multiplier, dim=1)
        return self.pointwise(self.depthwise(x))

    def spec(self) -> dict[str, Any]:
        """Describe the structure, enough to rebuild the module before loading its state_dict."""
        depthwise = self.depthwise
        return {
            "form": "separable",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "multiplier": self.multiplier,
            **_spatial_settings(depthwise),
            "bias": self.pointwise.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SeparableConv:
        return cls(**_arguments_from_spec(spec))


REPLACEMENT_FORMS = {"bottleneck": TuckerBottleneck, "separable": SeparableConv}
