"""Data-aware factorization: choose and fit low-rank forms by their output error on calibration inputs.

A k x k convolution computes ``y = W p`` for every receptive field ``p`` (an unfolded patch of
``I * kh * kw`` values, channel-major as ``F.unfold`` lays it out) with ``W`` of shape
``(O, I * kh * kw)``. Everything here works from the patch second moment ``C = E[p pᵀ]``,
collected once per layer, so an option's error costs a few small matrix products instead of a
pass over the images.

Every replacement is a fixed linear map ``z = Pᵀ p`` followed by a learned one:

- bottleneck: ``P = B ⊗ I_k`` where the reduce ``Bᵀ`` maps ``I`` channels to ``r_in``, then the
  core and expand, a map ``z -> y`` of rank at most ``r_out``;
- separable: ``P`` contains the ``I * K`` depthwise kernels, then the pointwise layer.

Given ``P``, the best map in the least-squares sense is the ridge regression
``M = Cyz (Czz + λ I)⁻¹`` with ``Czz = Pᵀ C P`` and ``Cyz = W C P``. A rank limit ``r_out`` keeps
the top ``r_out`` eigenvectors ``U`` of ``M Czz Mᵀ`` (reduced-rank regression) and gives the core
``Uᵀ M`` and the expand ``U``. The reduce ``B`` spans the input directions that carry the most output energy. Let
``C_ch = L Lᵀ`` be the channel second moment and ``W_j`` the ``(O, I)`` slice of kernel offset
``j``. Then ``B`` spans ``L⁻ᵀ T_r``, where ``T_r`` are the leading right singular vectors of the
stacked ``[W_j L]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimmer.decompose.separable import separable_factors
from slimmer.graph import run_with_hooks
from slimmer.layers import SeparableConv, TuckerBottleneck

# Rows of unfolded patches kept per batch and layer; larger feature maps are subsampled (seeded).
MAX_ROWS_PER_BATCH = 16384


def unfold_patches(features: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows of unfolded ``conv`` receptive fields: ``(N * positions, C_in * kh * kw)``."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:
            # padding="same" with stride 1: total padding dilation * (k - 1), the extra pixel at the end.
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            pad = (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2)
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            features = F.pad(features, pad, mode=mode)
            padding = (0, 0)
    elif conv.padding_mode != "zeros":
        pad = (padding[1], padding[1], padding[0], padding[0])
        features = F.pad(features, pad, mode=conv.padding_mode)
        padding = (0, 0)
    columns = F.unfold(features, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


class PatchMoments:
    """Running second moment ``E[p pᵀ]`` of one convolution's input patches, in float64."""

    def __init__(self, conv: nn.Conv2d, seed: int = 0):
        self.conv = conv
        self.sum = None
        self.rows = 0
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def add(self, features: torch.Tensor) -> None:
        features = features.detach().float()
        positions = len(unfold_patches(features[:1], self.conv))
        images = math.ceil(MAX_ROWS_PER_BATCH / positions)
        if images < len(features):
            # Unfold only as many (randomly chosen) images as the row budget needs.
            chosen = torch.randperm(len(features), generator=self.generator)[:images]
            features = features[chosen.sort().values]
        rows = unfold_patches(features, self.conv)
        if len(rows) > MAX_ROWS_PER_BATCH:
            keep = torch.randperm(len(rows), generator=self.generator)[:MAX_ROWS_PER_BATCH]
            rows = rows[keep]
        gram = (rows.T @ rows).double()
        self.sum = gram if self.sum is None else self.sum + gram
        self.rows += len(rows)

    def second_moment(self) -> torch.Tensor:
        if self.sum is None:
            raise ValueError("no inputs were recorded for this layer")
        return self.sum / self.rows


@torch.no_grad()
def collect_moments(model: nn.Module, convs: dict[str, nn.Conv2d], inputs: torch.Tensor,
                    batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Run ``inputs (N, C, H, W)`` through ``model`` once; return each named conv's patch second moment."""
    moments = {name: PatchMoments(conv, seed=index) for index, (name, conv) in enumerate(convs.items())}
    handles = [conv.register_forward_pre_hook(lambda _module, args, name=name: moments[name].add(args[0]))
               for name, conv in convs.items()]
    run_with_hooks(model, handles, inputs, batch_size)
    return {name: moment.second_moment() for name, moment in moments.items()}


def weight_matrix(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().double().reshape(conv.out_channels, -1)


def channel_moment(moment: torch.Tensor, kernel_positions: int) -> torch.Tensor:
    """Average of the ``(I, I)`` channel blocks on the diagonal of a patch second moment."""
    size = moment.shape[0] // kernel_positions
    blocks = moment.reshape(size, kernel_positions, size, kernel_positions)
    return torch.diagonal(blocks, dim1=1, dim2=3).mean(dim=-1)


def reduce_directions(conv: nn.Conv2d, moment: torch.Tensor | None) -> torch.Tensor:
    """Input-channel directions ordered by the output energy they carry: ``(I, I)``, orthonormal columns.

    Without a moment (data-free) the inputs are taken as white, which gives the leading left
    singular vectors of the kernel's mode-1 unfolding, as HOSVD does.
    """
    weight = conv.weight.detach().double()
    out_channels, in_channels = weight.shape[:2]
    positions = weight.shape[2] * weight.shape[3]
    stacked = weight.permute(2, 3, 0, 1).reshape(positions * out_channels, in_channels)
    if moment is None:
        _, _, right = torch.linalg.svd(stacked, full_matrices=False)
        return _complete_basis(right.T, in_channels)

    channels = channel_moment(moment, positions)
    channels = channels + 1e-6 * torch.trace(channels) / in_channels * torch.eye(in_channels, dtype=channels.dtype)
    lower = torch.linalg.cholesky(channels)
    _, _, right = torch.linalg.svd(stacked @ lower, full_matrices=False)
    directions = torch.linalg.solve_triangular(lower.T, right.T, upper=True)
    return _complete_basis(directions, in_channels)


def _complete_basis(directions: torch.Tensor, size: int) -> torch.Tensor:
    """Orthonormalize columns in order (Gram-Schmidt by QR) and pad to a square basis."""
    if directions.shape[1] < size:
        padding = torch.eye(size, dtype=directions.dtype)
        directions = torch.cat([directions, padding], dim=1)
    basis, triangular = torch.linalg.qr(directions)
    signs = torch.sign(torch.diagonal(triangular))
    signs[signs == 0] = 1
    return (basis * signs)[:, :size]


def _ridge(matrix: torch.Tensor, ridge: float) -> torch.Tensor:
    size = matrix.shape[0]
    return matrix + (ridge * torch.trace(matrix) / size + 1e-12) * torch.eye(size, dtype=matrix.dtype)


@dataclass
class LinearFit:
    """A fitted map from projected patches to outputs, and its relative output error."""

    matrix: torch.Tensor
    error: float


def _residual(moment_yy: torch.Tensor, moment_yz: torch.Tensor, moment_zz: torch.Tensor, matrix: torch.Tensor) -> float:
    """Relative error ``E||y - M z||² / E||y||²`` from second moments."""
    energy = torch.trace(moment_yy)
    residual = energy - 2 * torch.sum(matrix * moment_yz) + torch.sum((matrix @ moment_zz) * matrix)
    return max(float(residual / (energy + 1e-30)), 0.0)


def fit_from_moments(moment_yy: torch.Tensor, moment_yz: torch.Tensor, moment_zz: torch.Tensor, ridge: float,
                     rank: int | None = None) -> tuple[LinearFit, torch.Tensor | None]:
    """Ridge regression of ``y`` on ``z``, optionally of rank ``rank``; returns the fit and ``U`` when ranked."""
    matrix = torch.linalg.solve(_ridge(moment_zz, ridge), moment_yz.T).T
    basis = None
    if rank is not None and rank < matrix.shape[0]:
        explained = matrix @ moment_zz @ matrix.T
        _, vectors = torch.linalg.eigh((explained + explained.T) / 2)
        basis = vectors[:, -rank:].flip(1)
        matrix = basis @ (basis.T @ matrix)
    return LinearFit(matrix, _residual(moment_yy, moment_yz, moment_zz, matrix)), basis


def reduce_projection(directions: torch.Tensor, rank_in: int, positions: int) -> torch.Tensor:
    """Patch projection ``B ⊗ I_k`` for the first ``rank_in`` directions: ``(I * k, rank_in * k)``."""
    return torch.kron(directions[:, :rank_in].contiguous(), torch.eye(positions, dtype=directions.dtype))


def separable_projection(depthwise: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Patch projection of tiled depthwise kernels ``(I * K, 1, kh, kw)``: ``(I * k, I * K)``."""
    channels = depthwise.shape[0]
    positions = depthwise.shape[2] * depthwise.shape[3]
    kernels = depthwise.detach().double().reshape(channels, positions)
    projection = torch.zeros(in_channels * positions, channels, dtype=torch.float64)
    for channel in range(channels):
        source = channel % in_channels
        projection[source * positions:(source + 1) * positions, channel] = kernels[channel]
    return projection


class LayerFitter:
    """Output errors and data-aware weights of a layer's options, from its patch second moment.

    Without a moment (no calibration data) the patches are taken as white, so errors become
    weight approximation errors.
    """

    def __init__(self, conv: nn.Conv2d, moment: torch.Tensor | None, ridge: float = 1e-6):
        self.conv = conv
        self.ridge = ridge
        self.positions = conv.kernel_size[0] * conv.kernel_size[1]
        self.weight = weight_matrix(conv)
        size = self.weight.shape[1]
        self.moment = moment if moment is not None else torch.eye(size, dtype=torch.float64) / size
        self.moment_yp = self.weight @ self.moment
        self.moment_yy = self.moment_yp @ self.weight.T
        self.directions = reduce_directions(conv, moment)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _reduced(self, rank_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projection, ``Czz``, ``Cyz`` and the full-rank map for a reduce to ``rank_in`` channels."""
        if rank_in not in self._cache:
            if rank_in >= self.conv.in_channels:
                projection = torch.eye(self.weight.shape[1], dtype=torch.float64)
            else:
                projection = reduce_projection(self.directions, rank_in, self.positions)
            moment_zz = projection.T @ self.moment @ projection
            moment_yz = self.moment_yp @ projection
            matrix = torch.linalg.solve(_ridge(moment_zz, self.ridge), moment_yz.T).T
            self._cache[rank_in] = (projection, moment_zz, moment_yz, matrix)
        return self._cache[rank_in]

    def bottleneck_errors(self, rank_in: int, ranks_out: list[int]) -> dict[int, float]:
        """Relative output error for each output rank at one input rank (one eigendecomposition)."""
        _, moment_zz, moment_yz, matrix = self._reduced(rank_in)
        explained = matrix @ moment_zz @ matrix.T
        _, vectors = torch.linalg.eigh((explained + explained.T) / 2)
        vectors = vectors.flip(1)
        errors = {}
        for rank_out in ranks_out:
            ranked = matrix if rank_out >= self.conv.out_channels else vectors[:, :rank_out] @ (vectors[:, :rank_out].T @ matrix)
            errors[rank_out] = _residual(self.moment_yy, moment_yz, moment_zz, ranked)
        return errors

    def separable_error(self, multiplier: int) -> float:
        depthwise, _ = separable_factors(self.conv.weight, multiplier)
        projection = separable_projection(depthwise, self.conv.in_channels)
        moment_zz = projection.T @ self.moment @ projection
        fit, _ = fit_from_moments(self.moment_yy, self.moment_yp @ projection, moment_zz, self.ridge)
        return fit.error

    @torch.no_grad()
    def build_bottleneck(self, rank_in: int, rank_out: int) -> TuckerBottleneck:
        """Build the bottleneck with the data-aware reduce and the reduced-rank regression core and expand."""
        conv = self.conv
        module = TuckerBottleneck(conv.in_channels, conv.out_channels, rank_in, rank_out, conv.kernel_size,
                                  conv.stride, conv.padding, conv.dilation, conv.padding_mode, conv.bias is not None)
        projection, moment_zz, moment_yz, _ = self._reduced(rank_in)
        fit, basis = fit_from_moments(self.moment_yy, moment_yz, moment_zz, self.ridge,
                                      rank_out if hasattr(module, "expand") else None)
        set_bottleneck_weights(module, self.directions[:, :rank_in] if hasattr(module, "reduce") else None,
                               fit.matrix, basis)
        if conv.bias is not None:
            last = module.expand if hasattr(module, "expand") else module.core
            last.bias.copy_(conv.bias.detach())
        return module.to(dtype=conv.weight.dtype)

    @torch.no_grad()
    def build_separable(self, multiplier: int) -> SeparableConv:
        """Build the separable pair with weight-SVD depthwise kernels and a regression pointwise layer."""
        conv = self.conv
        module = SeparableConv(conv.in_channels, conv.out_channels, multiplier, conv.kernel_size, conv.stride,
                               conv.padding, conv.dilation, conv.padding_mode, conv.bias is not None)
        depthwise, _ = separable_factors(conv.weight, multiplier)
        projection = separable_projection(depthwise, conv.in_channels)
        fit, _ = fit_from_moments(self.moment_yy, self.moment_yp @ projection, projection.T @ self.moment @ projection,
                                  self.ridge)
        module.depthwise.weight.copy_(depthwise)
        module.pointwise.weight.copy_(fit.matrix.reshape(module.pointwise.weight.shape))
        if conv.bias is not None:
            module.pointwise.bias.copy_(conv.bias.detach())
        return module.to(dtype=conv.weight.dtype)


@torch.no_grad()
def set_bottleneck_weights(module: TuckerBottleneck, reduce: torch.Tensor | None, matrix: torch.Tensor,
                           basis: torch.Tensor | None) -> None:
    """Write a fitted map into a bottleneck: reduce ``(I, r_in)``, map ``(O, r_in * k)``, expand basis ``(O, r_out)``."""
    core = module.core
    if reduce is not None:
        module.reduce.weight.copy_(reduce.T.reshape(module.reduce.weight.shape).to(module.reduce.weight.dtype))
    if basis is not None:
        core_weight = basis.T @ matrix
        module.expand.weight.copy_(basis.reshape(module.expand.weight.shape).to(module.expand.weight.dtype))
    else:
        core_weight = matrix
    core.weight.copy_(core_weight.reshape(core.weight.shape).to(core.weight.dtype))


@torch.no_grad()
def refit_bottleneck(module: TuckerBottleneck, layer_input: torch.Tensor, target: torch.Tensor, ridge: float) -> None:
    """Refit a bottleneck's core and expand jointly so ``module(layer_input)`` matches ``target``; the reduce stays.

    ``target`` includes the bias of the last layer, which is kept as it is.
    """
    last = module.expand if hasattr(module, "expand") else module.core
    features = module.reduce(layer_input) if hasattr(module, "reduce") else layer_input
    rows = unfold_patches(features, module.core).double()
    outputs = target.movedim(1, -1).reshape(-1, target.shape[1]).double()
    if last.bias is not None:
        outputs = outputs - last.bias.detach().double()
    count = len(rows)
    moment_zz = rows.T @ rows / count
    moment_yz = outputs.T @ rows / count
    moment_yy = outputs.T @ outputs / count
    rank = module.rank_out if hasattr(module, "expand") else None
    fit, basis = fit_from_moments(moment_yy, moment_yz, moment_zz, ridge, rank)
    set_bottleneck_weights(module, None, fit.matrix, basis)

