"""Tucker-2 bottlenecks of single convolutions, and the rank rules of slimmer/decompose/ranks.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimmer.decompose.ranks import choose_rank, energy_rank, round_rank
from slimmer.decompose.tucker import bottleneck_from_conv, tucker2, unfold
from slimmer.recipe import RankRule

IN_CHANNELS = 6
OUT_CHANNELS = 10

# Exact rewrites in float32: the bottleneck runs up to three convolutions where the original runs
# one, and each sums at most IN_CHANNELS * 15 products, so rounding stays near 1e-7 of the output
# scale (measured: under 5e-7). Exactness here means max |difference| <= 1e-5 * max |reference|.
EXACT_TOLERANCE = 1e-5

LAYER_VARIANTS = [
    pytest.param({"kernel_size": 3, "stride": 2, "padding": 1}, id="stride2"),
    pytest.param({"kernel_size": 3, "dilation": 2, "padding": 2}, id="dilation2"),
    pytest.param({"kernel_size": 3, "padding": 1, "bias": True}, id="bias"),
    pytest.param({"kernel_size": (3, 5), "padding": (1, 2)}, id="kernel3x5"),
    pytest.param({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, id="reflect_padding"),
]


def make_conv(variant: dict, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    arguments = {"bias": False, **variant}
    return nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, **arguments).eval()


def layer_input(channels: int = IN_CHANNELS) -> torch.Tensor:
    # Odd height and width, so that stride and padding meet uneven borders.
    return torch.randn(2, channels, 13, 11, generator=torch.Generator().manual_seed(1))


def leading_projection(weight: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """Orthogonal projection onto the span of the ``rank`` leading left singular vectors of the unfolding."""
    left, _, _ = torch.linalg.svd(unfold(weight.detach().double(), mode), full_matrices=False)
    basis = left[:, :rank]
    return basis @ basis.T


def conv_with_weight(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    reference = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        reference.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is not None:
            reference.bias.copy_(conv.bias)
    return reference.eval()


def project_output_mode(conv: nn.Conv2d, rank: int) -> nn.Conv2d:
    """The convolution with weight ``W ×₀ P``, where P projects onto the leading output-mode subspace."""
    projection = leading_projection(conv.weight, 0, rank)
    weight = torch.einsum("po,oikl->pikl", projection, conv.weight.detach().double())
    return conv_with_weight(conv, weight)


def project_input_mode(conv: nn.Conv2d, rank: int) -> nn.Conv2d:
    """The convolution with weight ``W ×₁ P``, where P projects onto the leading input-mode subspace."""
    projection = leading_projection(conv.weight, 1, rank)
    weight = torch.einsum("pi,oikl->opkl", projection, conv.weight.detach().double())
    return conv_with_weight(conv, weight)


# Each form: (rank_in, rank_out, keep_full_rank_factors, child layers, reference the bottleneck must equal).
FORMS = [
    pytest.param((IN_CHANNELS, OUT_CHANNELS, True, ["reduce", "core", "expand"], lambda conv: conv),
                 id="full_rank_factors_kept"),
    pytest.param((IN_CHANNELS, OUT_CHANNELS, False, ["core"], lambda conv: conv), id="full_rank_folded"),
    pytest.param((IN_CHANNELS, 4, False, ["core", "expand"], lambda conv: project_output_mode(conv, 4)),
                 id="input_mode_folded"),
    pytest.param((3, OUT_CHANNELS, False, ["reduce", "core"], lambda conv: project_input_mode(conv, 3)),
                 id="output_mode_folded"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", LAYER_VARIANTS)
def test_bottleneck_matches_reference(variant: dict, form: tuple) -> None:
    rank_in, rank_out, keep, children, make_reference = form
    conv = make_conv(variant)
    bottleneck = bottleneck_from_conv(conv, rank_in, rank_out, keep_full_rank_factors=keep).eval()
    inputs = layer_input()

    with torch.no_grad():
        expected = make_reference(conv)(inputs)
        found = bottleneck(inputs)

    assert [name for name, _ in bottleneck.named_children()] == children
    assert found.shape == expected.shape
    assert (found - expected).abs().max().item() <= EXACT_TOLERANCE * expected.abs().max().item()


@pytest.mark.parametrize("variant", LAYER_VARIANTS)
def test_bottleneck_core_keeps_geometry(variant: dict) -> None:
    conv = make_conv(variant)
    core = bottleneck_from_conv(conv, 3, 4).core

    assert core.kernel_size == conv.kernel_size
    assert core.stride == conv.stride
    assert core.padding == conv.padding
    assert core.dilation == conv.dilation
    assert core.padding_mode == conv.padding_mode


def relative_output_error(conv: nn.Conv2d, rank: int, inputs: torch.Tensor) -> float:
    bottleneck = bottleneck_from_conv(conv, rank, rank).eval()
    with torch.no_grad():
        expected = conv(inputs)
        return ((bottleneck(inputs) - expected).norm() / expected.norm()).item()


def test_lossy_error_shrinks_with_rank(resnet20: nn.Module) -> None:
    conv = resnet20.layer3[1].conv1  # trained 64 -> 64 3x3 convolution
    inputs = torch.randn(4, 64, 8, 8, generator=torch.Generator().manual_seed(2))
    ranks = [8, 16, 32, 48, 64]
    errors = [relative_output_error(conv, rank, inputs) for rank in ranks]

    for smaller, larger, error_small, error_large in zip(ranks, ranks[1:], errors, errors[1:]):
        assert error_large < error_small, f"rank {larger} error {error_large} vs rank {smaller} error {error_small}"
    assert errors[-1] <= EXACT_TOLERANCE


def weight_error(weight: torch.Tensor, rank_in: int, rank_out: int, iterations: int) -> float:
    """Relative Frobenius error of the Tucker-2 reconstruction ``G ×₀ U ×₁ V`` in float64."""
    core, factor_out, factor_in = tucker2(weight, rank_in, rank_out, iterations)
    reconstruction = torch.einsum("rskl,or,is->oikl", core, factor_out, factor_in)
    return ((reconstruction - weight).norm() / weight.norm()).item()


@pytest.mark.parametrize("ranks", [(16, 16), (8, 32), (32, 8)], ids=["in16-out16", "in8-out32", "in32-out8"])
def test_hooi_not_worse_than_hosvd(resnet20: nn.Module, ranks: tuple[int, int]) -> None:
    weight = resnet20.layer3[1].conv1.weight.detach().double()
    rank_in, rank_out = ranks
    hosvd = weight_error(weight, rank_in, rank_out, iterations=0)
    hooi = weight_error(weight, rank_in, rank_out, iterations=5)

    # HOOI starts from HOSVD, and each sweep cannot increase the error (float64, so 1e-12 slack).
    assert hooi <= hosvd + 1e-12


@pytest.mark.parametrize("hooi_iterations", [0, 3], ids=["hosvd", "hooi"])
def test_zero_weights_give_no_nan(hooi_iterations: int) -> None:
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.arange(12, dtype=torch.float32))
    bottleneck = bottleneck_from_conv(conv, 2, 3, hooi_iterations).eval()
    with torch.no_grad():
        output = bottleneck(torch.randn(1, 8, 5, 5))

    assert all(torch.isfinite(parameter).all() for parameter in bottleneck.parameters())
    assert torch.equal(output, conv.bias.view(1, 12, 1, 1).expand_as(output))


@pytest.mark.parametrize("ranks", [(0, 4), (4, 0), (IN_CHANNELS + 1, 4), (4, OUT_CHANNELS + 1)],
                         ids=["in_zero", "out_zero", "in_too_large", "out_too_large"])
def test_tucker2_rejects_rank_outside_channels(ranks: tuple[int, int]) -> None:
    weight = torch.randn(OUT_CHANNELS, IN_CHANNELS, 3, 3)
    with pytest.raises(ValueError, match="must lie in"):
        tucker2(weight, *ranks)


def test_bottleneck_rejects_grouped_conv() -> None:
    conv = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        bottleneck_from_conv(conv, 2, 2)


def test_bottleneck_keeps_dtype_float64() -> None:
    conv = make_conv({"kernel_size": 3, "padding": 1}).double()
    bottleneck = bottleneck_from_conv(conv, 3, 4)

    assert all(parameter.dtype == torch.float64 for parameter in bottleneck.parameters())


# Rank rules.

def test_round_rank_ratio_of_three_channels() -> None:
    # ratio 0.5 of 3 channels is 1.5, which rounds half up to 2.
    assert choose_rank(RankRule(ratio=0.5), 3, torch.ones(3), round_to=1) == 2


def test_round_rank_clamps_to_channels() -> None:
    # ratio 0.5 of 3 channels rounds to one multiple of 8, which is more than the 3 channels.
    assert choose_rank(RankRule(ratio=0.5), 3, torch.ones(3), round_to=8) == 3


def test_round_to_larger_than_channels() -> None:
    assert choose_rank(RankRule(ratio=0.5), 24, torch.ones(24), round_to=32) == 24


@pytest.mark.parametrize(("value", "expected"), [(20, 24), (19, 16), (1, 8), (0.2, 8), (64, 64)],
                         ids=["tie_up", "nearest_down", "at_least_round_to", "below_one", "exact"])
def test_round_rank_nearest_multiple(value: float, expected: int) -> None:
    assert round_rank(value, round_to=8, channels=64) == expected


@pytest.mark.parametrize(("value", "expected"), [(17, 24), (16, 16), (0.5, 8)],
                         ids=["just_above", "exact_multiple", "fraction"])
def test_round_rank_up(value: float, expected: int) -> None:
    assert round_rank(value, round_to=8, channels=64, up=True) == expected


def test_fixed_rank_clamped() -> None:
    assert choose_rank(RankRule(fixed=100), 16, torch.ones(16), round_to=8) == 16


def test_energy_rank_zero_singular_values() -> None:
    assert energy_rank(torch.zeros(5), 0.9) == 1


def test_energy_rank_ignores_trailing_zeros() -> None:
    assert energy_rank(torch.tensor([2.0, 0.0, 0.0]), 1.0) == 1


@pytest.mark.parametrize(("energy", "expected"), [(0.64, 1), (0.65, 2), (1.0, 2)],
                         ids=["exactly_first", "just_above_first", "all"])
def test_energy_rank_threshold(energy: float, expected: int) -> None:
    # Squared singular values 16 and 9: the first keeps 16 / 25 = 0.64 of the energy.
    assert energy_rank(torch.tensor([4.0, 3.0]), energy) == expected


def test_energy_rule_rounds_up() -> None:
    # Ten equal singular values: energy 0.85 needs 9 of them. Nearest rounding would give 8,
    # but an energy rule must keep at least the requested energy, so it rounds up to 16.
    singular_values = torch.tensor([1.0] * 10 + [0.0] * 22)
    assert choose_rank(RankRule(energy=0.85), 32, singular_values, round_to=8) == 16


@given(value=st.floats(min_value=0.01, max_value=1000), round_to=st.integers(1, 64),
       channels=st.integers(1, 512), up=st.booleans())
def test_round_rank_stays_in_range(value: float, round_to: int, channels: int, up: bool) -> None:
    rank = round_rank(value, round_to, channels, up)

    assert 1 <= rank <= channels
    assert rank % round_to == 0 or rank == channels
