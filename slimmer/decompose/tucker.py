"""Tucker-2 decomposition of a convolution kernel into a 1x1 / k x k / 1x1 bottleneck.

A kernel ``W`` of shape ``(O, I, kh, kw)`` is approximated as ``W ≈ G ×₀ U ×₁ V`` with
``U: (O, r_out)``, ``V: (I, r_in)`` and core ``G = W ×₀ Uᵀ ×₁ Vᵀ`` of shape ``(r_out, r_in, kh, kw)``.
As layers: a 1x1 convolution ``I -> r_in`` with weight ``Vᵀ``, the k x k convolution ``r_in -> r_out``
with weight ``G``, and a 1x1 convolution ``r_out -> O`` with weight ``U`` and the original bias.
Because convolution is linear in each channel axis, the chain computes ``conv(x, G ×₀ U ×₁ V)``.

HOSVD initialization takes ``U`` and ``V`` as the leading left singular vectors of the mode-0 and
mode-1 unfoldings of ``W``. HOOI sweeps then alternate: ``U`` from the unfolding of ``W ×₁ Vᵀ``,
``V`` from that of ``W ×₀ Uᵀ``. With ``r_in = I`` and ``r_out = O`` the factorization is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from slimmer.layers import TuckerBottleneck


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: a matrix with ``tensor.shape[mode]`` rows."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def leading_singular_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Return the ``rank`` leading left singular vectors of ``matrix`` as columns (orthonormal even for a zero matrix)."""
    # The full left basis has rows x rows entries. The reduced SVD already gives it when the matrix is
    # wide (an unfolding usually is) and skips the much larger right basis.
    wide = matrix.shape[1] >= matrix.shape[0]
    left, _, _ = torch.linalg.svd(matrix, full_matrices=not wide)
    return left[:, :rank]


def mode_singular_values(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the mode-``mode`` unfolding of ``weight``, largest first."""
    return torch.linalg.svdvals(unfold(weight.detach().double(), mode))


def tucker2(
    weight: torch.Tensor, rank_in: int, rank_out: int, hooi_iterations: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor ``weight (O, I, kh, kw)`` into ``core (r_out, r_in, kh, kw)``, ``U (O, r_out)``, ``V (I, r_in)``.

    Computed in float64 and returned in the weight's dtype.
    """
    out_channels, in_channels = weight.shape[:2]
    if not 1 <= rank_out <= out_channels or not 1 <= rank_in <= in_channels:
        raise ValueError(
            f"ranks (in={rank_in}, out={rank_out}) must lie in [1, {in_channels}] and [1, {out_channels}]"
        )
    kernel = weight.detach().double()
    factor_out = leading_singular_vectors(unfold(kernel, 0), rank_out)
    factor_in = leading_singular_vectors(unfold(kernel, 1), rank_in)

    for _ in range(hooi_iterations):
        projected_in = torch.einsum("oikl,is->oskl", kernel, factor_in)
        factor_out = leading_singular_vectors(unfold(projected_in, 0), rank_out)
        projected_out = torch.einsum("oikl,or->rikl", kernel, factor_out)
        factor_in = leading_singular_vectors(unfold(projected_out, 1), rank_in)

    core = torch.einsum("oikl,or,is->rskl", kernel, factor_out, factor_in)
    return core.to(weight.dtype), factor_out.to(weight.dtype), factor_in.to(weight.dtype)


def bottleneck_from_conv(
    conv: nn.Conv2d, rank_in: int, rank_out: int, hooi_iterations: int = 0, keep_full_rank_factors: bool = False
) -> TuckerBottleneck:
    """Build a :class:`TuckerBottleneck` that approximates ``conv`` (groups must be 1).

    A factor at full rank is folded into the core unless ``keep_full_rank_factors`` is set.
    """
    if conv.groups != 1:
        raise ValueError(f"Tucker-2 needs groups=1, found groups={conv.groups}")
    out_channels, in_channels = conv.out_channels, conv.in_channels
    bottleneck = TuckerBottleneck(
        in_channels, out_channels, rank_in, rank_out, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.padding_mode, conv.bias is not None, keep_full_rank_factors,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)

    has_reduce = hasattr(bottleneck, "reduce")
    has_expand = hasattr(bottleneck, "expand")
    core, factor_out, factor_in = tucker2(
        conv.weight, rank_in if has_reduce else in_channels, rank_out if has_expand else out_channels,
        hooi_iterations,
    )
    # A mode left at full rank keeps the original channel basis: fold its orthogonal factor back in.
    if not has_expand:
        core = torch.einsum("rskl,or->oskl", core, factor_out)
    if not has_reduce:
        core = torch.einsum("rskl,is->rikl", core, factor_in)

    with torch.no_grad():
        if has_reduce:
            bottleneck.reduce.weight.copy_(factor_in.t().reshape(rank_in, in_channels, 1, 1))
        bottleneck.core.weight.copy_(core)
        last = bottleneck.expand if has_expand else bottleneck.core
        if has_expand:
            bottleneck.expand.weight.copy_(factor_out.reshape(out_channels, rank_out, 1, 1))
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return bottleneck
