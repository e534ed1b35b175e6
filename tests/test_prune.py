"""The prune pass: channel counts it leaves, shortcut groups it must skip, and exactness of what it removes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimmer
from slimmer.layers import TuckerBottleneck
from slimmer.passes import PassResult
from slimmer.recipe import DecomposeConfig, PruneConfig, RankRule

HALF_RANK = DecomposeConfig(rank=RankRule(ratio=0.5))
DIGITS_INPUT = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
CIFAR_INPUT = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
BLOCK_NAMES = [f"layer{stage}.{block}" for stage in (1, 2, 3) for block in range(3)]
STAGE_WIDTH = {"layer1": 16, "layer2": 32, "layer3": 64}


def bottlenecks(model: nn.Module) -> dict[str, TuckerBottleneck]:
    return {name: module for name, module in model.named_modules() if isinstance(module, TuckerBottleneck)}


@pytest.fixture(scope="module")
def decomposed_digits(trained_digits: nn.Module) -> nn.Module:
    # Ranks after decompose: features.3 (32 -> 64) in 16, out 32; features.7 and .10 (64 -> 64) 32 and 32.
    return slimmer.decompose(trained_digits, HALF_RANK, DIGITS_INPUT).model


@pytest.fixture(scope="module")
def pruned_digits(decomposed_digits: nn.Module) -> PassResult:
    return slimmer.prune(decomposed_digits, PruneConfig(ratio=0.5, round_to=8), DIGITS_INPUT)


def test_prune_keeps_output_shape(decomposed_digits: nn.Module, pruned_digits: PassResult) -> None:
    inputs = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert pruned_digits.model(inputs).shape == decomposed_digits(inputs).shape


def test_prune_reduces_ranks(decomposed_digits: nn.Module, pruned_digits: PassResult) -> None:
    before = bottlenecks(decomposed_digits)
    after = bottlenecks(pruned_digits.model)

    assert list(after) == list(before)
    for name in before:
        assert after[name].rank_in < before[name].rank_in, name
        assert after[name].rank_out < before[name].rank_out, name


def test_prune_ranks_multiple_of_round_to(pruned_digits: PassResult) -> None:
    for name, bottleneck in bottlenecks(pruned_digits.model).items():
        assert bottleneck.rank_in % 8 == 0, name
        assert bottleneck.rank_out % 8 == 0, name


def test_prune_halves_ranks(decomposed_digits: nn.Module, pruned_digits: PassResult) -> None:
    before = bottlenecks(decomposed_digits)
    for name, bottleneck in bottlenecks(pruned_digits.model).items():
        assert bottleneck.rank_in == before[name].rank_in // 2, name
        assert bottleneck.rank_out == before[name].rank_out // 2, name


def test_prune_records_each_group(pruned_digits: PassResult) -> None:
    # Two groups per bottleneck: the reduce output (rank_in) and the core output (rank_out).
    assert pruned_digits.stats == {"groups_pruned": 6, "groups_skipped": 0}


def test_prune_leaves_input_unchanged(decomposed_digits: nn.Module) -> None:
    before = {key: value.clone() for key, value in decomposed_digits.state_dict().items()}
    slimmer.prune(decomposed_digits, PruneConfig(ratio=0.5), DIGITS_INPUT)
    after = decomposed_digits.state_dict()

    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize(("ratio", "round_to", "expected_rank"), [(0.99, 1, 1), (0.95, 8, 8)],
                         ids=["ratio0.99-round1", "ratio0.95-round8"])
def test_prune_never_zero_channels(decomposed_digits: nn.Module, ratio: float, round_to: int,
                                   expected_rank: int) -> None:
    result = slimmer.prune(decomposed_digits, PruneConfig(ratio=ratio, round_to=round_to), DIGITS_INPUT)
    convs = [module for module in result.model.modules() if isinstance(module, nn.Conv2d)]

    assert min(conv.in_channels for conv in convs) >= 1
    assert min(conv.out_channels for conv in convs) >= 1
    assert {module.rank_in for module in bottlenecks(result.model).values()} == {expected_rank}
    assert {module.rank_out for module in bottlenecks(result.model).values()} == {expected_rank}


def test_prune_ratio_zero_skips_all(decomposed_digits: nn.Module) -> None:
    result = slimmer.prune(decomposed_digits, PruneConfig(ratio=0.0), DIGITS_INPUT)

    assert result.changed == []
    assert all("keeps all" in skip.reason for skip in result.skipped)


# ResNet-20: every block's output joins a residual stream, and where the width doubles, the shortcut
# zero-pads channels with F.pad. torch-pruning treats F.pad as channel-preserving, so it couples the
# 16-, 32- and 64-channel streams, so the prune pass must skip those groups.

@pytest.fixture(scope="module")
def decomposed_resnet20(loaded_resnet20: nn.Module) -> nn.Module:
    return slimmer.decompose(loaded_resnet20, HALF_RANK, CIFAR_INPUT).model


@pytest.fixture(scope="module")
def pruned_all_1x1(decomposed_resnet20: nn.Module) -> PassResult:
    return slimmer.prune(decomposed_resnet20, PruneConfig(targets="all_1x1", ratio=0.5), CIFAR_INPUT)


def test_all_1x1_output_shape(pruned_all_1x1: PassResult) -> None:
    with torch.no_grad():
        output = pruned_all_1x1.model(torch.randn(2, 3, 32, 32))

    assert output.shape == (2, 10)
    assert torch.isfinite(output).all()


def test_all_1x1_skips_shortcut_groups(pruned_all_1x1: PassResult) -> None:
    reasons = {skip.name: skip.reason for skip in pruned_all_1x1.skipped}
    for block in BLOCK_NAMES:
        root = f"{block}.conv2.expand"
        assert root in reasons, root
        assert ("does not model" in reasons[root]) or ("cannot map" in reasons[root]), reasons[root]


def test_all_1x1_keeps_residual_widths(pruned_all_1x1: PassResult) -> None:
    for block in BLOCK_NAMES:
        expand = pruned_all_1x1.model.get_submodule(f"{block}.conv2.expand")
        assert expand.out_channels == STAGE_WIDTH[block.split(".")[0]], block


def test_all_1x1_prunes_block_inner(pruned_all_1x1: PassResult) -> None:
    # conv1.expand feeds only bn1 and conv2 inside its block, so it is a plain 1x1 group to prune.
    roots = {change.details["root"] for change in pruned_all_1x1.changed}
    model = pruned_all_1x1.model

    assert "layer2.0.conv1.expand" in roots
    assert model.layer2[0].conv1.expand.out_channels == 16
    assert model.layer2[0].bn1.num_features == 16
    assert model.layer2[0].conv2.reduce.in_channels == 16


def test_all_1x1_coupled_names_exist(decomposed_resnet20: nn.Module, pruned_all_1x1: PassResult) -> None:
    names = {name for name, _ in decomposed_resnet20.named_modules()}
    for change in pruned_all_1x1.changed:
        assert set(change.details["coupled"]) <= names, change.details["coupled"]


class ChannelPad(nn.Module):
    """A 1x1 conv whose output is zero-padded by ``pad`` channels on each side before the next conv.

    With pad=2, torch-pruning maps the pruned channels straight through F.pad, off by the 2 padded channels:
    the pruned model runs, with matching shapes, but computes something else. Only the comparison
    with the masked model can catch that. With pad=0 the same layers form a plain prunable group.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad
        self.expand = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8 + 2 * pad, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.pad(self.expand(x), (0, 0, 0, 0, self.pad, self.pad)))


def prune_channel_pad(pad: int) -> tuple[nn.Module, PassResult]:
    torch.manual_seed(0)
    model = ChannelPad(pad).eval()
    config = PruneConfig(targets="all_1x1", ratio=0.5, round_to=1)
    return model, slimmer.prune(model, config, torch.randn(1, 4, 6, 6))


def test_channel_pad_group_rolled_back() -> None:
    model, result = prune_channel_pad(pad=2)
    inputs = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(inputs)
        found = result.model(inputs)

    assert result.changed == []
    assert [skip.name for skip in result.skipped] == ["expand"]
    assert "did not match the masked one" in result.skipped[0].reason
    assert result.model.expand.out_channels == 8
    assert torch.equal(found, expected)


def test_channel_pad_zero_pruned() -> None:
    _, result = prune_channel_pad(pad=0)

    assert [change.name for change in result.changed] == ["expand"]
    assert result.model.expand.out_channels == 4
    assert result.model.head.in_channels == 4


def matching_indices(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """For each slice of ``pruned`` along dim 0, the index of the identical slice of ``original``."""
    pruned_rows = pruned.detach().flatten(1)
    original_rows = original.detach().flatten(1)
    equal = (pruned_rows[:, None, :] == original_rows[None, :, :]).all(dim=2)
    assert (equal.sum(dim=1) == 1).all(), "every kept channel must match exactly one original channel"
    return equal.float().argmax(dim=1).tolist()


def test_pruned_equals_masked(decomposed_resnet20: nn.Module) -> None:
    config = PruneConfig(ratio=0.5, include=["layer3.0.conv1"])
    result = slimmer.prune(decomposed_resnet20, config, CIFAR_INPUT)
    before = decomposed_resnet20.layer3[0].conv1
    after = result.model.layer3[0].conv1

    # Which internal channels survived: reduce keeps rows of its weight, expand keeps columns.
    kept_in = matching_indices(after.reduce.weight, before.reduce.weight)
    kept_out = matching_indices(after.expand.weight.transpose(0, 1), before.expand.weight.transpose(0, 1))
    removed_in = sorted(set(range(before.rank_in)) - set(kept_in))
    removed_out = sorted(set(range(before.rank_out)) - set(kept_out))

    # The masked model: the unpruned one with the removed channels' producing weights zeroed.
    masked = copy.deepcopy(decomposed_resnet20)
    with torch.no_grad():
        masked.layer3[0].conv1.reduce.weight[removed_in] = 0
        masked.layer3[0].conv1.core.weight[removed_out] = 0

    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unpruned_output = decomposed_resnet20(inputs)
        masked_output = masked(inputs)
        pruned_output = result.model(inputs)
    scale = masked_output.abs().max().item()

    assert (after.rank_in, after.rank_out) == (8, 16)
    assert len(removed_in) == 8
    assert len(removed_out) == 16
    assert (pruned_output - masked_output).abs().max().item() <= 1e-5 * scale
    # The removed channels carried signal, so the comparison above is not trivially true.
    assert (unpruned_output - masked_output).abs().max().item() > 1e-3 * scale


class ResidualStream(nn.Module):
    """A 1x1 stem and two blocks that add a 1x1 projection into the same 16-channel stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.inner = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(2))
        self.projection = nn.ModuleList(nn.Conv2d(16, 16, 1) for _ in range(2))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for inner, projection in zip(self.inner, self.projection):
            x = x + projection(F.relu(inner(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(("ratio", "round_to", "kept"), [(0.25, 1, 12), (0.75, 8, 8), (0.5, 4, 8)])
def test_shared_group_pruned_once(ratio: float, round_to: int, kept: int) -> None:
    torch.manual_seed(0)
    model = ResidualStream().eval()
    result = slimmer.prune(model, PruneConfig(targets="all_1x1", ratio=ratio, round_to=round_to), CIFAR_INPUT)
    reasons = {skip.name: skip.reason for skip in result.skipped}

    assert [change.details["root"] for change in result.changed] == ["stem"]
    assert result.changed[0].details["channels_after"] == kept
    assert result.model.stem.out_channels == kept
    assert [layer.out_channels for layer in result.model.projection] == [kept, kept]
    assert result.model.head.in_features == kept
    assert reasons["projection.0"] == "its channel group was already pruned through stem in this step"
    assert reasons["projection.1"] == "its channel group was already pruned through stem in this step"
