"""Decompose, prune and export on small models built around the structures real CNNs use.

Each pattern is checked three ways. Decomposing at an exact rank leaves the function unchanged.
Pruning equals zeroing the removed channels in the unpruned model, which this file works out from
the weights, apart from the pass's own check. After compression, onnxruntime matches PyTorch at
batch sizes 1 and 3.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

import onnx
import pytest
import torch
import torch.fx
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual

import patterns
import slimmer
from slimmer.cost import output_shapes, output_tensors
from slimmer.decompose.separable import separable_from_conv
from slimmer.decompose.tucker import bottleneck_from_conv
from slimmer.errors import CheckFailedError, InputError
from slimmer.graph import set_module
from slimmer.layers import SeparableConv, TuckerBottleneck
from slimmer.passes import PassResult
from slimmer.recipe import DecomposeConfig, PruneConfig, RankRule

PATTERNS: dict[str, Callable[[], nn.Module]] = {
    "residual": patterns.Residual,
    "inception_concat": patterns.InceptionConcat,
    "dense_concat": patterns.DenseConcat,
    "split_shuffle": patterns.ShuffleUnit,
    "channel_roll": patterns.ChannelRoll,
    "squeeze_excite": patterns.SqueezeExcite,
    "grouped_depthwise": patterns.GroupedDepthwise,
    "dilated_strided": patterns.DilatedStrided,
    "non_square": patterns.NonSquare,
    "pad_reflect": lambda: patterns.PaddingMode("reflect"),
    "pad_replicate": lambda: patterns.PaddingMode("replicate"),
    "pad_circular": lambda: patterns.PaddingMode("circular"),
    "shared_weights": patterns.SharedWeights,
    "tuple_output": patterns.TupleOutput,
    "dict_output": patterns.DictOutput,
    "data_dependent": patterns.DataDependent,
}

# Exact forms: Tucker-2 at the rank the weights have, and the separable pair with multiplier 1 on
# weights of Tucker rank 1, whose every input-channel slice then has rank 1.
EXACT_FORMS = {
    "bottleneck": (2, DecomposeConfig(rank=RankRule(fixed=2), round_to=1, min_channels=1)),
    "separable": (1, DecomposeConfig(form="separable", multiplier=RankRule(fixed=1), min_channels=1)),
}
LOSSY = DecomposeConfig(rank=RankRule(ratio=0.5), round_to=1, min_channels=1)
PRUNE_ALL_1X1 = PruneConfig(targets="all_1x1", ratio=0.5, round_to=1)

# The rewritten models sum in another order in float32. Measured differences reach about 9e-7 of
# the output scale.
FLOAT_TOLERANCE = 1e-5


def build(pattern: str) -> nn.Module:
    torch.manual_seed(0)
    return PATTERNS[pattern]().eval()


def sample(count: int, seed: int = 0) -> torch.Tensor:
    """Positive inputs ``(count, 8, 12, 12)``, so that DataDependent takes the same branch for all of them."""
    return torch.randn((count, *patterns.INPUT_SHAPE), generator=torch.Generator().manual_seed(seed)).abs()


EXAMPLE = sample(1)


def outputs(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model.eval()(inputs))


def relative_difference(expected: list[torch.Tensor], found: list[torch.Tensor]) -> float:
    assert [tensor.shape for tensor in found] == [tensor.shape for tensor in expected]
    return max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(expected, found))


def make_low_rank(model: nn.Module, rank: int) -> nn.Module:
    """Give every dense k x k conv a weight of Tucker-2 rank ``(rank, rank)`` (random core and orthonormal factors)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size != (1, 1):
            out_channels, in_channels, height, width = module.weight.shape
            core = torch.randn(rank, rank, height, width, generator=generator)
            factor_out = torch.linalg.qr(torch.randn(out_channels, rank, generator=generator))[0]
            factor_in = torch.linalg.qr(torch.randn(in_channels, rank, generator=generator))[0]
            weight = torch.einsum("abkl,oa,ib->oikl", core, factor_out, factor_in) / (rank * height * width) ** 0.5
            with torch.no_grad():
                module.weight.copy_(weight)
    return model


def skip_reasons(result: PassResult) -> dict[str, str]:
    return {skip.name: skip.reason for skip in result.skipped}


# Exact rewrites -------------------------------------------------------------------------------


@pytest.mark.parametrize("form", EXACT_FORMS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_exact_rank_matches_original(pattern: str, form: str) -> None:
    rank, config = EXACT_FORMS[form]
    model = make_low_rank(build(pattern), rank)
    result = slimmer.decompose(model, config, EXAMPLE)
    inputs = sample(3, seed=1)

    assert result.changed, skip_reasons(result)
    assert relative_difference(outputs(model, inputs), outputs(result.model, inputs)) <= FLOAT_TOLERANCE


def replace_at_full_rank(model: nn.Module, form: str) -> int:
    """Replace every dense k x k conv called once by its exact form, keeping full-rank 1x1 factors; return the count."""
    shapes = {name: shape.calls for name, shape in slimmer.cost.record_shapes(model, EXAMPLE).items()}
    replaced = 0
    for name, conv in list(model.named_modules()):
        if (not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.kernel_size == (1, 1)
                or shapes.get(name) != 1 or name in ("tied_a", "tied_b")):
            continue
        if form == "bottleneck":
            replacement = bottleneck_from_conv(conv, conv.in_channels, conv.out_channels, keep_full_rank_factors=True)
        else:
            replacement = separable_from_conv(conv, min(conv.out_channels, conv.kernel_size[0] * conv.kernel_size[1]))
        set_module(model, name, replacement)
        replaced += 1
    return replaced


@pytest.mark.parametrize("form", EXACT_FORMS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_full_rank_factors_match(pattern: str, form: str) -> None:
    model = build(pattern)
    rewritten = copy.deepcopy(model)
    inputs = sample(3, seed=2)

    assert replace_at_full_rank(rewritten, form) > 0
    assert relative_difference(outputs(model, inputs), outputs(rewritten, inputs)) <= FLOAT_TOLERANCE


# Pruning --------------------------------------------------------------------------------------


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """For each output channel of ``pruned``, the index of the original channel it came from.

    Every element of a random weight is distinct, so the first element of a pruned row is found
    at exactly one place in the original weight.
    """
    rows = []
    for row in range(pruned.shape[0]):
        positions = (original == pruned[row].flatten()[0]).nonzero()
        assert len(positions) == 1, "a pruned weight must come from exactly one place in the original"
        rows.append(int(positions[0, 0]))
    return rows


def masked_model(unpruned: nn.Module, pruned: nn.Module) -> nn.Module:
    """Zero, in a copy of ``unpruned``, the output channels of every conv that pruning made narrower.

    The patterns' batch norms have their initial statistics, so they map a zeroed channel to zero.
    """
    masked = copy.deepcopy(unpruned)
    pruned_modules = dict(pruned.named_modules())
    for name, conv in masked.named_modules():
        narrower = pruned_modules.get(name)
        if not isinstance(conv, nn.Conv2d) or narrower.out_channels == conv.out_channels:
            continue
        removed = sorted(set(range(conv.out_channels)) - set(kept_rows(conv.weight, narrower.weight)))
        with torch.no_grad():
            conv.weight[removed] = 0
            if conv.bias is not None:
                conv.bias[removed] = 0
    return masked


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pruned_equals_masked(pattern: str) -> None:
    decomposed = slimmer.decompose(build(pattern), LOSSY, EXAMPLE).model
    result = slimmer.prune(decomposed, PRUNE_ALL_1X1, EXAMPLE)
    inputs = sample(3, seed=3)
    masked = masked_model(decomposed, result.model)

    assert result.changed
    assert relative_difference(outputs(masked, inputs), outputs(result.model, inputs)) <= FLOAT_TOLERANCE
    # The removed channels carried signal, so the comparison above is not trivially true.
    assert relative_difference(outputs(decomposed, inputs), outputs(masked, inputs)) > 1e-3


@pytest.mark.parametrize(("pattern", "root"), [
    ("residual", "block2.1.expand"),
    ("inception_concat", "mix"),
    ("dense_concat", "transition"),
    ("dict_output", "aux.expand"),
])
def test_output_groups_skipped(pattern: str, root: str) -> None:
    decomposed = slimmer.decompose(build(pattern), LOSSY, EXAMPLE).model
    result = slimmer.prune(decomposed, PRUNE_ALL_1X1, EXAMPLE)

    assert skip_reasons(result)[root] == "its channels reach the model output, whose shape must not change"


def test_channel_roll_rolled_back() -> None:
    model = build("channel_roll")
    result = slimmer.prune(model, PRUNE_ALL_1X1, EXAMPLE)
    inputs = sample(3, seed=6)

    assert result.changed == []
    assert "did not match the masked one" in skip_reasons(result)["mix"]
    assert relative_difference(outputs(model, inputs), outputs(result.model, inputs)) == 0.0


def test_grouped_consumer_rolled_back() -> None:
    # Pruning dense1's output takes input channels from the 4-group conv unevenly across its groups,
    # and torch-pruning 1.6.1 then leaves a model that fails to run.
    decomposed = slimmer.decompose(build("grouped_depthwise"), LOSSY, EXAMPLE).model
    result = slimmer.prune(decomposed, PRUNE_ALL_1X1, EXAMPLE)
    reason = skip_reasons(result)["dense1.expand"]

    assert reason.startswith("its channel group passes through an operation torch-pruning does not model")
    assert reason.endswith("coupled layers: dense1.expand, grouped")
    assert result.model.dense1.expand.out_channels == 16
    assert result.model.grouped.in_channels == 16


# Pattern-specific behaviour -------------------------------------------------------------------


def test_grouped_convs_keep_groups() -> None:
    result = slimmer.decompose(build("grouped_depthwise"), LOSSY, EXAMPLE)
    pruned = slimmer.prune(result.model, PRUNE_ALL_1X1, EXAMPLE).model
    reasons = skip_reasons(result)

    assert reasons["grouped"].startswith("grouped convolution (groups=4)")
    assert reasons["depthwise"].startswith("grouped convolution (groups=16)")
    assert (pruned.grouped.groups, pruned.grouped.in_channels, pruned.grouped.out_channels) == (4, 16, 16)
    assert (pruned.depthwise.groups, pruned.depthwise.in_channels, pruned.depthwise.out_channels) == (16, 16, 16)


def spatial_settings(conv: nn.Conv2d) -> tuple:
    return conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode


@pytest.mark.parametrize("form", EXACT_FORMS)
@pytest.mark.parametrize("pattern", ["dilated_strided", "non_square", "pad_reflect", "pad_circular"])
def test_spatial_settings_on_core_only(pattern: str, form: str) -> None:
    rank, config = EXACT_FORMS[form]
    original = make_low_rank(build(pattern), rank)
    result = slimmer.decompose(original, config, EXAMPLE)
    one_by_one = ((1, 1), (1, 1), (0, 0), (1, 1), "zeros")

    for change in result.changed:
        before = original.get_submodule(change.name)
        after = result.model.get_submodule(change.name)
        if form == "bottleneck":
            assert isinstance(after, TuckerBottleneck), change.name
            assert spatial_settings(after.core) == spatial_settings(before), change.name
            assert spatial_settings(after.reduce) == one_by_one, change.name
            assert spatial_settings(after.expand) == one_by_one, change.name
        else:
            assert isinstance(after, SeparableConv), change.name
            assert spatial_settings(after.depthwise) == spatial_settings(before), change.name
            assert spatial_settings(after.pointwise) == one_by_one, change.name


def test_shared_and_tied_convs_skipped() -> None:
    result = slimmer.decompose(build("shared_weights"), LOSSY, EXAMPLE)
    reasons = skip_reasons(result)

    assert [change.name for change in result.changed] == ["entry"]
    assert reasons["twice"].startswith("used in more than one place")
    assert reasons["tied_a"].startswith("holds a parameter that another module also holds")
    assert reasons["tied_b"].startswith("holds a parameter that another module also holds")


def test_shared_weights_stay_single() -> None:
    decomposed = slimmer.decompose(build("shared_weights"), LOSSY, EXAMPLE).model
    result = slimmer.prune(decomposed, PRUNE_ALL_1X1, EXAMPLE)
    model = result.model
    reasons = skip_reasons(result)

    assert model.tied_a.weight is model.tied_b.weight
    assert type(model.twice) is nn.Conv2d
    assert reasons["twice_1x1"].startswith("used in more than one place or holds tied weights")
    # entry's output feeds the conv used twice, which feeds the tied pair.
    assert reasons["entry.expand"].startswith("its channel group includes tied_a, twice, twice_1x1")


def test_frozen_parameters_stay_frozen() -> None:
    model = build("residual")
    for parameter in model.block1.parameters():
        parameter.requires_grad_(False)
    decomposed = slimmer.decompose(model, LOSSY, EXAMPLE)
    pruned = slimmer.prune(decomposed.model, PRUNE_ALL_1X1, EXAMPLE)
    frozen = {name: not parameter.requires_grad for name, parameter in pruned.model.named_parameters()}

    assert {change.name for change in decomposed.changed} >= {"block1.0.0", "block2.0.0"}
    assert pruned.changed
    assert all(is_frozen for name, is_frozen in frozen.items() if name.startswith("block1.")), frozen
    assert not any(is_frozen for name, is_frozen in frozen.items() if not name.startswith("block1.")), frozen


def test_fully_frozen_model_prunes() -> None:
    model = build("inception_concat").requires_grad_(False)
    decomposed = slimmer.decompose(model, LOSSY, EXAMPLE).model
    result = slimmer.prune(decomposed, PRUNE_ALL_1X1, EXAMPLE)

    assert "branch1.0" in {change.details["root"] for change in result.changed}
    assert not any(parameter.requires_grad for parameter in result.model.parameters())


def test_data_dependent_model_untraceable() -> None:
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(build("data_dependent"))


def test_data_dependent_compresses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    decomposed = slimmer.decompose(build("data_dependent"), LOSSY, EXAMPLE)
    pruned = slimmer.prune(decomposed.model, PRUNE_ALL_1X1, EXAMPLE)
    with caplog.at_level(logging.WARNING, logger="slimmer.export"):
        path = slimmer.export_onnx(pruned.model, EXAMPLE, tmp_path / "model.onnx")
    parity = slimmer.check_parity(path, pruned.model, sample(3, seed=4), atol=1e-4, rtol=1e-3)

    assert {change.name for change in decomposed.changed} == {"conv", "positive"}
    assert skip_reasons(decomposed)["negative"] == "not called in a forward pass on the example input"
    assert "ONNX export fixed a value computed from the example input at" in caplog.text
    assert "patterns.py" in caplog.text
    assert parity["passed"]


def test_prune_skips_group_beside_untaken_branch() -> None:
    decomposed = slimmer.decompose(build("data_dependent"), LOSSY, EXAMPLE)
    pruned = slimmer.prune(decomposed.model, PRUNE_ALL_1X1, EXAMPLE)
    reason = skip_reasons(pruned)["mix"]

    assert "mix" not in {change.details["root"] for change in pruned.changed}
    assert reason.startswith("the example input never reached negative, which takes or gives 16 channels")
    assert "data-dependent control flow" in reason
    # The bottleneck's internal channels never leave it, so they are still pruned.
    assert "positive.reduce" in {change.details["root"] for change in pruned.changed}


def test_pruned_model_runs_untaken_branch() -> None:
    decomposed = slimmer.decompose(build("data_dependent"), LOSSY, EXAMPLE)
    pruned = slimmer.prune(decomposed.model, PRUNE_ALL_1X1, EXAMPLE).model
    negative_inputs = -sample(3, seed=5)

    # Pruning removes weights, so only the shapes can be compared with the unpruned model.
    expected = outputs(decomposed.model, negative_inputs)
    found = outputs(pruned, negative_inputs)

    assert [tensor.shape for tensor in found] == [tensor.shape for tensor in expected]


class BrokenOnNegative(nn.Module):
    """A model whose branch for negative-mean inputs expects more channels than the layer before gives."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(patterns.CHANNELS, 4, 1)
        self.positive = nn.Conv2d(4, 4, 1)
        self.negative = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.positive if bool(x.mean() > 0) else self.negative
        return branch(self.conv(x))


def test_parity_names_untaken_branch(tmp_path: Path) -> None:
    model = BrokenOnNegative().eval()
    path = slimmer.export_onnx(model, EXAMPLE, tmp_path / "model.onnx")

    with pytest.raises(CheckFailedError) as caught:
        slimmer.check_parity(path, model, -sample(2, seed=6), atol=1e-4, rtol=1e-3)

    message = str(caught.value)
    assert message.startswith("the compressed PyTorch model fails on the parity or validation inputs (RuntimeError: ")
    assert "data-dependent control flow" in message
    assert "exclude those layers" in message
    assert "\n" not in message


def shufflenet_stage() -> nn.Module:
    torch.manual_seed(0)
    units = [InvertedResidual(16, 16, 1) for _ in range(3)]
    return nn.Sequential(nn.Conv2d(patterns.CHANNELS, 16, 3, padding=1), *units).eval()


@pytest.fixture(scope="module")
def pruned_shufflenet_stage() -> tuple[nn.Module, PassResult]:
    # torch-pruning 1.6.1 divides by zero in the reshape of the third unit's channel shuffle.
    decomposed = slimmer.decompose(shufflenet_stage(), LOSSY, EXAMPLE).model
    return decomposed, slimmer.prune(decomposed, PRUNE_ALL_1X1, EXAMPLE)


def test_untraceable_graph_named(pruned_shufflenet_stage: tuple[nn.Module, PassResult]) -> None:
    _, result = pruned_shufflenet_stage
    reason = skip_reasons(result)["1.branch2.5"]

    assert reason.startswith("torch-pruning could not build the dependency graph of the whole model (ZeroDivisionError")
    assert "at a ViewBackward0 operation that follows" in reason
    assert reason.endswith("and no enclosing module that it can trace alone holds the whole channel group")


def test_untraceable_graph_pruned_in_parts(pruned_shufflenet_stage: tuple[nn.Module, PassResult]) -> None:
    decomposed, result = pruned_shufflenet_stage
    traced = {change.details["root"]: change.details.get("traced_module") for change in result.changed}
    inputs = sample(3, seed=7)

    assert traced["0.reduce"] is None
    assert traced["1.branch2.0"] == "1.branch2"
    assert traced["3.branch2.0"] == "3.branch2"
    # The unit's branch has 8 channels; half are pruned from the 1x1 conv and the depthwise conv after it.
    assert result.model[1].branch2[0].out_channels == 4
    assert result.model[1].branch2[3].groups == 4
    assert result.model[1].branch2[3].out_channels == 4
    assert relative_difference(outputs(masked_model(decomposed, result.model), inputs),
                               outputs(result.model, inputs)) <= FLOAT_TOLERANCE


# Compression end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [*PATTERNS, "shufflenet_stage"])
def test_compressed_onnx_parity(pattern: str, tmp_path: Path) -> None:
    original = shufflenet_stage() if pattern == "shufflenet_stage" else build(pattern)
    decomposed = slimmer.decompose(original, LOSSY, EXAMPLE).model
    compressed = slimmer.prune(decomposed, PruneConfig(targets="all_1x1", ratio=0.25, round_to=1), EXAMPLE).model
    path = slimmer.export_onnx(compressed, EXAMPLE, tmp_path / "model.onnx")
    inputs = sample(3, seed=5)
    one_at_a_time = slimmer.check_parity(path, compressed, inputs, atol=1e-4, rtol=1e-3, batch_size=1)
    all_at_once = slimmer.check_parity(path, compressed, inputs, atol=1e-4, rtol=1e-3, batch_size=3)
    with torch.no_grad():
        shapes_before = output_shapes(original(inputs))
        shapes_after = output_shapes(compressed(inputs))

    assert shapes_after == shapes_before
    assert one_at_a_time["passed"]
    assert all_at_once["passed"]
    assert one_at_a_time["outputs"] == len(shapes_before)


@pytest.mark.parametrize(("pattern", "names"), [
    ("tuple_output", ["output_0", "output_1"]),
    ("dict_output", ["output_out", "output_aux"]),
    ("residual", ["output"]),
])
def test_apply_names_every_output(pattern: str, names: list[str], tmp_path: Path) -> None:
    recipe = {"model": {"input_shape": list(patterns.INPUT_SHAPE)},
              "steps": [{"decompose": {"rank": {"ratio": 0.5}, "round_to": 1, "min_channels": 1}},
                        {"prune": {"targets": "all_1x1", "ratio": 0.25, "round_to": 1}}],
              "export": {"parity": {"samples": 3}}, "report": {"latency": {"enabled": False}}}
    _, report = slimmer.apply(build(pattern), recipe, output_dir=tmp_path / "out", architecture=None)
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph

    assert [output.name for output in graph.output] == names
    assert all(output.type.tensor_type.shape.dim[0].dim_param == "batch" for output in graph.output)
    assert report["parity"]["outputs"] == len(names)
    assert report["parity"]["passed"]


class FirstOutput(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def test_parity_rejects_missing_output(tmp_path: Path) -> None:
    model = build("tuple_output")
    path = slimmer.export_onnx(model, EXAMPLE, tmp_path / "model.onnx")
    logits_only = FirstOutput(model)
    with pytest.raises(CheckFailedError, match="onnxruntime returned 2 outputs and PyTorch 1"):
        slimmer.check_parity(path, logits_only, sample(2), atol=1e-4, rtol=1e-3)


# Input shape ----------------------------------------------------------------------------------


def test_missing_input_shape_from_model() -> None:
    recipe = {"steps": [{"decompose": {"rank": {"ratio": 0.5}}}],
              "export": {"parity": {"samples": 1}}, "report": {"latency": {"enabled": False}}}
    _, report = slimmer.apply(build("dilated_strided"), recipe)

    assert report["recipe_resolved"]["model"]["input_shape"] == [patterns.CHANNELS, 224, 224]


def test_wrong_input_shape_rejected() -> None:
    recipe = {"model": {"input_shape": [3, 12, 12]}, "steps": [], "report": {"latency": {"enabled": False}}}
    with pytest.raises(InputError, match=r"fails on an input of shape \[1, 3, 12, 12\] \(model.input_shape"):
        slimmer.apply(build("residual"), recipe)
