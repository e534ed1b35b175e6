"""Depthwise-separable factorization of a convolution kernel: depthwise k x k, then pointwise 1x1.

For each input channel ``i``, the slice ``W[:, i]`` of shape ``(O, kh*kw)`` has the SVD
``Σ_k s_k p_k q_kᵀ``. Keeping ``K`` terms gives ``I*K`` depthwise filters, filter ``(i, k)`` with
kernel ``q_k`` applied to input channel ``i``, followed by a 1x1 convolution whose column for
``(i, k)`` is ``s_k p_k``. Summing over ``i`` and ``k`` gives back ``Σ_i W[:, i] * x_i``, so the pair
is exact at ``K = min(O, kh*kw)``. Channels are laid out as the tiled input of
:class:`~slimmer.layers.SeparableConv` expects: channel ``k*I + i`` is filter ``(i, k)``.
Stride, padding, dilation and padding_mode stay on the depthwise convolution; the pointwise
one carries the bias.
"""

from __future__ import annotations

import torch
from torch import nn

from slimmer.layers import SeparableConv


def channel_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of each input channel's ``(O, kh*kw)`` slice: shape ``(I, min(O, kh*kw))``, largest first."""
    out_channels, in_channels = weight.shape[:2]
    slices = weight.detach().double().permute(1, 0, 2, 3).reshape(in_channels, out_channels, -1)
    return torch.linalg.svdvals(slices)


def separable_factors(weight: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``weight (O, I, kh, kw)`` into depthwise ``(I*K, 1, kh, kw)`` and pointwise ``(O, I*K, 1, 1)``, tiled layout.

    Computed in float64 and returned in the weight's dtype.
    """
    out_channels, in_channels, kernel_height, kernel_width = weight.shape
    full = min(out_channels, kernel_height * kernel_width)
    if not 1 <= multiplier <= full:
        raise ValueError(f"channel multiplier {multiplier} must lie in [1, {full}] = [1, min(O, kh*kw)]")

    slices = weight.detach().double().permute(1, 0, 2, 3).reshape(in_channels, out_channels, -1)
    left, singular_values, right = torch.linalg.svd(slices, full_matrices=False)
    kernels = right[:, :multiplier, :]
    columns = left[:, :, :multiplier] * singular_values[:, None, :multiplier]

    # kernels (I, K, kh*kw) and columns (I, O, K) go to channel k*I + i of the tiled layout.
    depthwise = kernels.transpose(0, 1).reshape(in_channels * multiplier, 1, kernel_height, kernel_width)
    pointwise = columns.permute(1, 2, 0).reshape(out_channels, in_channels * multiplier, 1, 1)
    return depthwise.to(weight.dtype), pointwise.to(weight.dtype)


def separable_from_conv(conv: nn.Conv2d, multiplier: int) -> SeparableConv:
    """Build a :class:`SeparableConv` that approximates ``conv`` (groups must be 1)."""
    if conv.groups != 1:
        raise ValueError(f"the separable factorization needs groups=1, found groups={conv.groups}")
    module = SeparableConv(
        conv.in_channels, conv.out_channels, multiplier, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.padding_mode, conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    depthwise, pointwise = separable_factors(conv.weight, multiplier)
    with torch.no_grad():
        module.depthwise.weight.copy_(depthwise)
        module.pointwise.weight.copy_(pointwise)
        if conv.bias is not None:
            module.pointwise.bias.copy_(conv.bias.detach())
    return module
