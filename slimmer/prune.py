"""Prune pass: remove 1x1-convolution channels through torch-pruning's dependency graph.

Each pruning group (the channels of one layer and everything coupled to them) is checked before
it is kept: the pruned model must compute the same output as the unpruned model with those
channels zeroed ("masked"). torch-pruning does not model every operation, such as a shortcut that
zero-pads channels with ``F.pad``. A group that passes through such an operation fails the check,
is rolled back and is reported as skipped, and so is a group whose channels reach the model
output. A group is also skipped when a module the example input never reached (a branch of
data-dependent control flow, for example) takes or gives as many channels as the group and sits
beside one of its layers, because the trace cannot show whether that module shares the channels.
Each channel group is pruned at most once per pass, so a residual stream shared by several 1x1
targets loses ``ratio`` of its channels once. A final forward pass checks the output shapes.

The internal channels of a bottleneck never leave it, so torch-pruning traces each bottleneck on
its own, on the input it receives in the model, and the check runs on that bottleneck alone.
This works in any model, even one whose whole graph torch-pruning cannot trace. Other 1x1 targets
(``targets: all_1x1``) use the dependency graph of the whole model. When torch-pruning cannot
build it, each of them is pruned inside the smallest enclosing module that torch-pruning can
trace alone and that contains its whole group, and the check runs on that module.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from slimmer.cost import LayerShape, output_tensors, record_shapes
from slimmer.errors import CheckFailedError
from slimmer.graph import get_module, matches, modules_with_shared_parameters, set_module, shared_modules
from slimmer.layers import TuckerBottleneck
from slimmer.passes import LayerChange, LayerSkip, PassResult
from slimmer.recipe import PruneConfig

logger = logging.getLogger(__name__)

MASK_TOLERANCE = 1e-4
WHOLE_MODEL = ""


@dataclass
class _Target:
    """A conv whose output channels are pruned, the layer reported, and the module torch-pruning traces."""

    root: str
    owner: str
    scope: str


@torch.no_grad()
def _forward(model: nn.Module, example_input: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    return output_tensors(model(example_input))


SHARED_REASON = "used in more than one place or holds tied weights; pruning it would change every use"
OUTPUT_REASON = "its channels reach the model output, whose shape must not change"


def _shared_names(model: nn.Module, shapes: dict[str, LayerShape]) -> set[str]:
    """Names of modules called more than once, reachable under several names, or holding tied parameters."""
    shared = shared_modules(model) | modules_with_shared_parameters(model)
    return {name for name, module in model.named_modules()
            if id(module) in shared or (name in shapes and shapes[name].calls > 1)}


@dataclass
class _Unreached:
    """An outermost module the example input never reached, with the channels it takes and gives.

    The channel counts are those of its first and last convolution or linear layer.
    """

    name: str
    parent: str
    in_channels: int
    out_channels: int


def _channel_counts(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return None


def _unreached_modules(model: nn.Module, shapes: dict[str, LayerShape]) -> list[_Unreached]:
    """List the outermost modules that hold a convolution or linear layer and did not run on the example input.

    A container such as ``nn.ModuleList`` is never called itself, so a module counts as reached when
    it or any module inside it ran.
    """
    reached = {ancestor for name in shapes for ancestor in [name, *enclosing_modules(name)]}
    unreached = []
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if not name or name in reached or (parent and parent not in reached):
            continue
        counts = [count for inner in module.modules() if (count := _channel_counts(inner)) is not None]
        if counts:
            unreached.append(_Unreached(name, parent, counts[0][0], counts[-1][1]))
    return unreached


def _unreached_reason(coupled: list[str], channels: int, unreached: list[_Unreached]) -> str | None:
    """Explain why a group of ``channels`` channels may reach a module the example input never ran, else None.

    The trace contains only the modules that ran, so a module on a path not taken is counted as a
    possible member when it sits in a module that also contains a layer of the group and takes or
    gives ``channels`` channels.
    """
    for module in unreached:
        beside = not module.parent or any(name.startswith(module.parent + ".") for name in coupled)
        if beside and channels in (module.in_channels, module.out_channels):
            return (f"the example input never reached {module.name}, which takes or gives {channels} channels and "
                    "may share this channel group (data-dependent control flow, for example); pruning could break "
                    "inputs that take that path")
    return None


def _not_prunable_reason(name: str, shape: LayerShape | None, shared: set[str]) -> str | None:
    if shape is None:
        return "not called in a forward pass on the example input"
    if name in shared:
        return SHARED_REASON
    return None


def _targets(model: nn.Module, config: PruneConfig, shapes: dict[str, LayerShape],
             shared: set[str]) -> tuple[list[_Target], list[LayerSkip]]:
    """List the targets, bottleneck-internal ones first, and the candidate layers that cannot be pruned."""
    targets: list[_Target] = []
    skipped: list[LayerSkip] = []
    for name, module in model.named_modules():
        if isinstance(module, TuckerBottleneck) and matches(name, config.include, config.exclude):
            reason = _not_prunable_reason(name, shapes.get(name), shared)
            if reason is not None:
                skipped.append(LayerSkip(name, reason))
                continue
            if hasattr(module, "reduce"):
                targets.append(_Target(f"{name}.reduce", name, name))
            if hasattr(module, "expand"):
                targets.append(_Target(f"{name}.core", name, name))
    if config.targets == "all_1x1":
        already_listed = {target.root for target in targets} | {skip.name for skip in skipped}
        for name, module in model.named_modules():
            if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
                    and name not in already_listed and matches(name, config.include, config.exclude)):
                reason = _not_prunable_reason(name, shapes.get(name), shared)
                if reason is not None:
                    skipped.append(LayerSkip(name, reason))
                else:
                    targets.append(_Target(name, name, WHOLE_MODEL))
    return targets, skipped


def _keep_count(channels: int, ratio: float, round_to: int) -> int:
    remaining = channels * (1.0 - ratio)
    steps = max(int(remaining / round_to + 0.5), 1)
    return min(steps * round_to, channels)


@torch.no_grad()
def _capture_inputs(model: nn.Module, names: list[str], example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the input each named module receives in one forward pass on ``example_input``.

    Only modules called with one tensor and no keyword arguments are listed, since only those can
    be run again on their own.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            if len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs:
                captured.setdefault(name, args[0].detach().clone())
        handles.append(get_module(model, name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _forward(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _build_graph(module: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``module`` with torch-pruning; frozen parameters take part in the trace and stay frozen."""
    frozen = [parameter for parameter in module.parameters() if not parameter.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        with torch.enable_grad():
            # A tuple, because torch-pruning 1.6 first calls model(*example_inputs), which splits a
            # bare tensor along its batch axis.
            return tp.DependencyGraph().build_dependency(module, example_inputs=(example_input,), verbose=False)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def describe_trace_failure(error: BaseException, model: nn.Module) -> str:
    """Say where torch-pruning stopped: the graph node it was processing and the named modules that feed it.

    The node is looked up in the local variables of torch-pruning's frames, which depend on its
    version. Without a node the description is the error alone.
    """
    text = f"{type(error).__name__}: {error}"
    node = None
    traceback = error.__traceback__
    while traceback is not None:
        # The innermost frame that has a node wins; its first node is usually the function's argument.
        nodes = [value for value in traceback.tb_frame.f_locals.values() if isinstance(value, tp.dependency.Node)]
        node = nodes[0] if nodes else node
        traceback = traceback.tb_next
    if node is None:
        return text
    names = {module: name for name, module in model.named_modules()}
    feeding: list[str] = []
    frontier, seen = list(node.inputs), set()
    while frontier and len(feeding) < 3:
        current = frontier.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.module in names:
            feeding.append(names[current.module])
        else:
            frontier.extend(current.inputs)
    operation = type(node.grad_fn).__name__ if node.grad_fn is not None else type(node.module).__name__
    after = f" that follows {', '.join(feeding)}" if feeding else ""
    return f"{text}, at a {operation} operation{after}"


@torch.no_grad()
def _masked_output(model: nn.Module, group: Any, example_input: torch.Tensor) -> list[torch.Tensor]:
    """Run ``model`` with the group's pruned channels zeroed at every layer that produces them."""
    saved: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []
    for dependency, indices in group:
        layer = dependency.target.module
        if not group._DG.is_out_channel_pruning_fn(dependency.handler):
            continue
        if not isinstance(layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            continue
        for parameter in (layer.weight, getattr(layer, "bias", None)):
            if parameter is not None:
                saved.append((parameter, list(indices), parameter.data[indices].clone()))
                parameter.data[indices] = 0
    try:
        return _forward(model, example_input)
    finally:
        for parameter, indices, values in reversed(saved):
            parameter.data[indices] = values


def _same(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> bool:
    if len(reference) != len(candidate):
        return False
    for expected, found in zip(reference, candidate):
        if expected.shape != found.shape or not torch.isfinite(found).all():
            return False
        scale = expected.abs().max().item() + 1e-12
        if (expected - found).abs().max().item() > MASK_TOLERANCE * scale:
            return False
    return True


def _importance(config: PruneConfig) -> tp.importance.Importance:
    return tp.importance.GroupMagnitudeImportance(p=1 if config.importance == "l1" else 2,
                                                  group_reduction="mean", normalizer=None)


def _graph_or_reason(model: nn.Module, scope: str, example_input: torch.Tensor,
                     log_level: int = logging.WARNING) -> tp.DependencyGraph | str:
    """Trace the module at ``scope`` ("" for the whole model); return the graph, or why it could not be built."""
    try:
        return _build_graph(get_module(model, scope), example_input)
    # torch-pruning fails in many ways on operations it does not model (ZeroDivisionError, KeyError, ...).
    except Exception as error:  # noqa: BLE001
        where = describe_trace_failure(error, get_module(model, scope))
        logger.log(log_level, "torch-pruning could not trace %s: %s", scope or "the model", where)
        if scope == WHOLE_MODEL:
            return f"torch-pruning could not build the dependency graph of the whole model ({where})"
        return f"torch-pruning could not trace {scope} ({where})"


def _coupled_names(group: Any, scope_module: nn.Module, scope: str) -> list[str]:
    """Qualified names of the modules in ``group``; torch-pruning's nodes for functions (add, pad) have none."""
    names = {module: name for name, module in scope_module.named_modules()}
    prefix = f"{scope}." if scope else ""
    return sorted({(prefix + names[dep.target.module]).rstrip(".") for dep, _ in group
                   if dep.target.module in names})


def _producer_names(group: Any, graph: tp.DependencyGraph, scope_module: nn.Module, scope: str) -> list[str]:
    """Qualified names of the modules in ``group`` whose output channels it removes."""
    names = {module: name for name, module in scope_module.named_modules()}
    prefix = f"{scope}." if scope else ""
    return sorted({(prefix + names[dep.target.module]).rstrip(".") for dep, _ in group
                   if dep.target.module in names and graph.is_out_channel_pruning_fn(dep.handler)})


def _prune_target(model: nn.Module, target: _Target, graph: tp.DependencyGraph, config: PruneConfig,
                  importance: tp.importance.Importance, scope_input: torch.Tensor, shared: set[str],
                  unreached: list[_Unreached],
                  log_level: int = logging.WARNING) -> tuple[nn.Module, LayerChange | LayerSkip, bool]:
    """Prune one group and check it against the masked model; log a group kept out at ``log_level``.

    Returns the model (a restored copy when a whole-model group was rolled back), the record, and
    whether a rollback happened, after which the graphs must be traced again.
    """
    root = get_module(model, target.root)
    channels = root.out_channels
    keep = _keep_count(channels, config.ratio, config.round_to)
    if keep >= channels:
        return model, LayerSkip(target.root, f"ratio {config.ratio} with round_to={config.round_to} "
                                             f"keeps all {channels} channels"), False

    try:
        group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=list(range(channels)))
        scores = importance(group)
        if scores is None:
            return model, LayerSkip(target.root, "torch-pruning found no weights to score in its group"), False
        pruned_indices = sorted(torch.argsort(scores)[: channels - keep].tolist())
        group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=pruned_indices)
    except (RuntimeError, ValueError, IndexError) as error:
        logger.log(log_level, "Kept %s out of pruning: torch-pruning failed on its group: %s", target.root, error)
        return model, LayerSkip(target.root, f"torch-pruning cannot map its channel group "
                                             f"({type(error).__name__}: {error})"), False
    if not graph.check_pruning_group(group):
        return model, LayerSkip(target.root, "pruning would leave a coupled layer with 0 channels"), False
    scope_module = get_module(model, target.scope)
    coupled = _coupled_names(group, scope_module, target.scope)
    # torch-pruning would give a tied or reused layer new weights for one of its uses only.
    shared_coupled = sorted(set(coupled) & shared)
    if shared_coupled:
        return model, LayerSkip(target.root, f"its channel group includes {', '.join(shared_coupled)}, "
                                             f"{SHARED_REASON}"), False
    unreached_reason = _unreached_reason(coupled, channels, unreached)
    if unreached_reason is not None:
        logger.log(log_level, "Kept %s out of pruning: %s", target.root, unreached_reason)
        return model, LayerSkip(target.root, unreached_reason), False
    producers = _producer_names(group, graph, scope_module, target.scope)

    # The check runs on the traced module alone: the bottleneck, or the whole model.
    expected = _masked_output(scope_module, group, scope_input)
    snapshot = copy.deepcopy(scope_module)
    unmodeled = "its channel group passes through an operation torch-pruning does not model"
    failure = None
    try:
        group.prune()
        found = _forward(scope_module, scope_input)
        if [tensor.shape for tensor in found] != [tensor.shape for tensor in expected]:
            failure = OUTPUT_REASON
        elif not _same(expected, found):
            failure = f"{unmodeled} (the pruned model did not match the masked one); coupled layers: {', '.join(coupled)}"
    except (RuntimeError, ValueError, IndexError) as error:
        failure = (f"{unmodeled} (the pruned model failed: {type(error).__name__}: {error}); "
                   f"coupled layers: {', '.join(coupled)}")
    if failure is not None:
        if target.scope == WHOLE_MODEL:
            model = snapshot
        else:
            set_module(model, target.scope, snapshot)
        logger.log(log_level, "Kept %s out of pruning: %s", target.root, failure)
        return model, LayerSkip(target.root, failure), True

    logger.info("Pruned %s: %d -> %d channels", target.root, channels, keep)
    return model, LayerChange(
        target.owner, before=f"{target.root}: {channels} channels", after=f"{keep} channels",
        details={"root": target.root, "channels_before": channels, "channels_after": keep, "coupled": coupled,
                 "producers": producers},
    ), False


def enclosing_modules(name: str) -> list[str]:
    """Qualified names of the modules that contain ``name``, innermost first, the whole model left out."""
    parts = name.split(".")
    return [".".join(parts[:length]) for length in range(len(parts) - 1, 0, -1)]


class _Pruner:
    """The state of one prune pass: the model, the traced graphs and the inputs of traced modules."""

    def __init__(self, model: nn.Module, config: PruneConfig, example_input: torch.Tensor,
                 shapes: dict[str, LayerShape], shared: set[str]) -> None:
        self.model = model
        self.config = config
        self.importance = _importance(config)
        self.shapes = shapes
        self.shared = shared
        self.unreached = _unreached_modules(model, shapes)
        self.example_input = example_input
        self.inputs: dict[str, torch.Tensor] = {WHOLE_MODEL: example_input}
        self.graphs: dict[str, tp.DependencyGraph | str] = {}

    def capture(self, scopes: list[str]) -> None:
        missing = [scope for scope in scopes if scope not in self.inputs]
        if missing:
            self.inputs.update(_capture_inputs(self.model, missing, self.example_input))

    def graph(self, scope: str, log_level: int = logging.WARNING) -> tp.DependencyGraph | str:
        """Return the graph of the module at ``scope``, traced on first use, or why it could not be traced."""
        if scope not in self.graphs:
            if scope in self.inputs:
                self.graphs[scope] = _graph_or_reason(self.model, scope, self.inputs[scope], log_level)
            else:
                self.graphs[scope] = f"{scope} is not called with one tensor alone, so it cannot be traced on its own"
        return self.graphs[scope]

    def prune_in(self, target: _Target, log_level: int = logging.WARNING) -> LayerChange | LayerSkip | None:
        """Prune ``target`` with the graph of its scope; None when that graph could not be built."""
        graph = self.graph(target.scope, log_level)
        if isinstance(graph, str):
            return None
        self.model, record, rolled_back = _prune_target(self.model, target, graph, self.config, self.importance,
                                                        self.inputs[target.scope], self.shared, self.unreached,
                                                        log_level)
        if rolled_back or isinstance(record, LayerChange):
            self.forget_graphs(target.scope, including_own=rolled_back)
        return record

    def forget_graphs(self, scope: str, including_own: bool) -> None:
        """Drop the graphs that a change inside ``scope`` made stale: those of the modules overlapping it.

        A graph refers to the modules it traced and records channel offsets (of concatenations, for
        example), so a group pruned through another graph, or a module restored from a copy, needs a
        new one. Pruning through a graph keeps that graph valid, so ``including_own`` is for rollbacks.
        """
        def stale(other: str) -> bool:
            if isinstance(self.graphs[other], str):
                return False
            if other == scope:
                return including_own
            if WHOLE_MODEL in (scope, other):
                return True
            return other.startswith(scope + ".") or scope.startswith(other + ".")

        self.graphs = {other: graph for other, graph in self.graphs.items() if not stale(other)}

    def prune_within_parts(self, target: _Target, whole_reason: str) -> LayerChange | LayerSkip:
        """Prune ``target`` inside the smallest enclosing module that contains its whole group.

        Used when the whole model cannot be traced. Each enclosing module called once with one tensor
        is traced on its own, innermost first, and the check runs on that module alone. A group that
        reaches the module's output moves on to the next one.
        """
        scopes = [scope for scope in enclosing_modules(target.root)
                  if self.shapes.get(scope) is not None and self.shapes[scope].calls == 1 and scope not in self.shared]
        self.capture(scopes)
        for scope in scopes:
            record = self.prune_in(_Target(target.root, target.owner, scope), log_level=logging.DEBUG)
            if record is None or (isinstance(record, LayerSkip) and record.reason == OUTPUT_REASON):
                continue
            if isinstance(record, LayerChange):
                record.details["traced_module"] = scope
            else:
                logger.warning("Kept %s out of pruning: %s", target.root, record.reason)
            return record
        return LayerSkip(target.root, f"{whole_reason}, and no enclosing module that it can trace alone holds "
                                      "the whole channel group")


def prune(model: nn.Module, config: PruneConfig, example_input: torch.Tensor, inplace: bool = False) -> PassResult:
    """Prune a ``config.ratio`` share of the channels of each selected 1x1 group, lowest importance first.

    A group is the set of layers whose channels must be removed together, such as every layer that
    adds into one residual stream. Each group is pruned once, through the first target in it, and
    its other targets are listed as skipped. Channel counts kept are multiples of ``config.round_to``
    and never 0. Layers called more than once or holding weights shared with another module are
    skipped. Parameters with
    ``requires_grad=False`` stay frozen. When torch-pruning cannot trace the whole model, each
    1x1 target is pruned inside the smallest enclosing module it can trace that contains the target's
    whole group. The returned model is checked by a forward pass: output shapes must equal the
    input model's.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    reference_shapes = [tensor.shape for tensor in _forward(model, example_input)]
    shapes = record_shapes(model, example_input)
    shared = _shared_names(model, shapes)
    targets, skipped = _targets(model, config, shapes, shared)
    result = PassResult("prune", model, skipped=skipped)

    pruner = _Pruner(model, config, example_input, shapes, shared)
    pruner.capture(sorted({target.scope for target in targets} - {WHOLE_MODEL}))
    pruned_through: dict[str, str] = {}
    for target in targets:
        if target.root in pruned_through:
            result.skipped.append(LayerSkip(target.root, f"its channel group was already pruned through "
                                                         f"{pruned_through[target.root]} in this step"))
            continue
        record = pruner.prune_in(target)
        if record is None:
            reason = pruner.graph(target.scope)
            assert isinstance(reason, str)
            if target.scope == WHOLE_MODEL:
                record = pruner.prune_within_parts(target, reason)
            else:
                record = LayerSkip(target.root, reason)
        if isinstance(record, LayerChange):
            result.changed.append(record)
            for name in record.details["producers"]:
                pruned_through.setdefault(name, target.root)
        else:
            result.skipped.append(record)
    model = result.model = pruner.model

    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    final_shapes = [tensor.shape for tensor in _forward(model, example_input)]
    if final_shapes != reference_shapes:
        raise CheckFailedError(f"pruning changed the output shapes from {reference_shapes} to {final_shapes}")
    result.stats = {"groups_pruned": len(result.changed), "groups_skipped": len(result.skipped)}
    return result
