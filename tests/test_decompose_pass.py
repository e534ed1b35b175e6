"""The decompose pass on the trained ResNet-20 and on small models with layers it must skip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimmer
from slimmer.layers import TuckerBottleneck
from slimmer.passes import PassResult
from slimmer.recipe import DecomposeConfig, RankRule

HALF_RANK = DecomposeConfig(rank=RankRule(ratio=0.5))

# ResNet-20: 3 stages x 3 basic blocks x 2 convolutions of 3x3. The stem conv1 (3 -> 16) has fewer
# input channels than min_channels=8.
BLOCK_CONVS = {f"layer{stage}.{block}.conv{index}" for stage in (1, 2, 3) for block in range(3) for index in (1, 2)}


@pytest.fixture
def half_rank(resnet20: nn.Module, cifar_input: torch.Tensor) -> PassResult:
    return slimmer.decompose(resnet20, HALF_RANK, cifar_input)


def skip_reasons(result: PassResult) -> dict[str, str]:
    return {skip.name: skip.reason for skip in result.skipped}


def test_decompose_leaves_input_unchanged(resnet20: nn.Module, cifar_input: torch.Tensor) -> None:
    before = {key: value.clone() for key, value in resnet20.state_dict().items()}
    slimmer.decompose(resnet20, HALF_RANK, cifar_input)
    after = resnet20.state_dict()

    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert not any(isinstance(module, TuckerBottleneck) for module in resnet20.modules())


def test_decompose_rewrites_block_convs(half_rank: PassResult) -> None:
    assert {change.name for change in half_rank.changed} == BLOCK_CONVS
    assert half_rank.stats["rewritten"] == 18


def test_decompose_skips_stem_conv(half_rank: PassResult) -> None:
    assert skip_reasons(half_rank) == {"conv1": "3 -> 16 channels is below min_channels=8"}


def test_decompose_halves_ranks(half_rank: PassResult) -> None:
    for name in BLOCK_CONVS:
        bottleneck = half_rank.model.get_submodule(name)
        assert isinstance(bottleneck, TuckerBottleneck), name
        assert bottleneck.rank_in == bottleneck.in_channels // 2, name
        assert bottleneck.rank_out == bottleneck.out_channels // 2, name


def test_decompose_include_exclude(resnet20: nn.Module, cifar_input: torch.Tensor) -> None:
    config = DecomposeConfig(rank=RankRule(ratio=0.5), include=["layer2.*"], exclude=["layer2.0.*"])
    result = slimmer.decompose(resnet20, config, cifar_input)

    assert {change.name for change in result.changed} == {
        "layer2.1.conv1", "layer2.1.conv2", "layer2.2.conv1", "layer2.2.conv2"}
    assert isinstance(result.model.layer1[0].conv1, nn.Conv2d)
    assert isinstance(result.model.layer2[0].conv2, nn.Conv2d)


def test_decompose_reduces_macs(half_rank: PassResult, resnet20: nn.Module, cifar_input: torch.Tensor) -> None:
    macs_before, _ = slimmer.count_macs(resnet20, cifar_input)
    macs_after, _ = slimmer.count_macs(half_rank.model, cifar_input)
    saved_by_changes = sum(change.details["macs_before"] - change.details["macs_after"]
                           for change in half_rank.changed)

    assert macs_after < macs_before
    assert macs_before - macs_after == saved_by_changes


def test_decompose_macs_match_counter(half_rank: PassResult, cifar_input: torch.Tensor) -> None:
    _, per_layer = slimmer.count_macs(half_rank.model, cifar_input)
    for change in half_rank.changed:
        counted = sum(macs for name, macs in per_layer.items() if name.startswith(change.name + "."))
        assert counted == change.details["macs_after"], change.name


@pytest.mark.parametrize(("rank", "macs_after"), [
    # 16 -> 16 channels, 3x3, 32x32 output. Ranks 15: reduce 16*15, core 15*15*9, expand 15*16 per pixel.
    pytest.param(RankRule(fixed=15), 32 * 32 * (16 * 15 + 15 * 15 * 9 + 15 * 16), id="rank15_of_16"),
    # Full rank folds both factors into the core: the same layer again.
    pytest.param(RankRule(ratio=1.0), 32 * 32 * 16 * 16 * 9, id="full_rank"),
])
def test_decompose_skips_costlier_replacement(resnet20: nn.Module, cifar_input: torch.Tensor,
                                              rank: RankRule, macs_after: int) -> None:
    config = DecomposeConfig(rank=rank, round_to=1, include=["layer1.0.conv1"])
    result = slimmer.decompose(resnet20, config, cifar_input)
    macs_before = 32 * 32 * 16 * 16 * 9

    assert result.changed == []
    assert skip_reasons(result)["layer1.0.conv1"].endswith(f"gives {macs_after} MACs, not fewer than {macs_before}")
    assert isinstance(result.model.layer1[0].conv1, nn.Conv2d)


class MixedConvs(nn.Module):
    """Dense, grouped, depthwise and 1x1 convolutions, one shared conv used twice, and one never called."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Conv2d(16, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 32, 1)
        self.shared = nn.Conv2d(32, 32, 3, padding=1)
        self.unused = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.grouped(self.dense(x))))
        return self.shared(self.shared(x))


@pytest.fixture(scope="module")
def mixed_result() -> PassResult:
    torch.manual_seed(0)
    return slimmer.decompose(MixedConvs(), HALF_RANK, torch.randn(1, 16, 10, 10))


def test_mixed_rewrites_dense_only(mixed_result: PassResult) -> None:
    assert [change.name for change in mixed_result.changed] == ["dense"]


def test_grouped_conv_skipped(mixed_result: PassResult) -> None:
    assert skip_reasons(mixed_result)["grouped"].startswith("grouped convolution (groups=4)")


def test_depthwise_conv_skipped(mixed_result: PassResult) -> None:
    assert skip_reasons(mixed_result)["depthwise"].startswith("grouped convolution (groups=32)")


def test_pointwise_conv_skipped(mixed_result: PassResult) -> None:
    assert skip_reasons(mixed_result)["pointwise"] == "1x1 kernel; nothing to factor"


def test_shared_conv_skipped(mixed_result: PassResult) -> None:
    assert skip_reasons(mixed_result)["shared"].startswith("used in more than one place")


def test_uncalled_conv_skipped(mixed_result: PassResult) -> None:
    assert skip_reasons(mixed_result)["unused"] == "not called in a forward pass on the example input"


def test_skipped_layers_stay_conv(mixed_result: PassResult) -> None:
    for name in ("grouped", "depthwise", "pointwise", "shared", "unused"):
        assert type(mixed_result.model.get_submodule(name)) is nn.Conv2d, name


def test_min_macs_skips_small_layer(resnet20: nn.Module, cifar_input: torch.Tensor) -> None:
    # layer1.0.conv1 costs 32*32*16*16*9 = 2,359,296 MACs, one below the limit.
    config = DecomposeConfig(rank=RankRule(ratio=0.5), min_macs=2_359_297, include=["layer1.0.conv1"])
    result = slimmer.decompose(resnet20, config, cifar_input)

    assert skip_reasons(result)["layer1.0.conv1"] == "2359296 MACs is below min_macs=2359297"
