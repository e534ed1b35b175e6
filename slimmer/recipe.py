"""Recipe schema: a typed, validated description of one slimmer run.

A recipe is a YAML mapping with the model to load, the data to use, an ordered list of steps
(``decompose``, ``prune``, ``finetune``) and export and report settings. Unknown keys are
rejected, and every problem is reported at once with its place in the file (``steps[1].rank``).
Relative paths in a recipe are resolved against the folder that contains the recipe file.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimmer.errors import RecipeError

RECIPE_VERSION = 1

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """How to build the model and load ``model.pt`` into it."""

    architecture: str | None = Field(None, description="'package.module:callable' that builds the model")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    state_dict_key: str | None = Field(
        "auto", description="key of the state_dict inside a checkpoint; 'auto' tries state_dict and model"
    )
    strip_prefix: str | None = Field("module.", description="prefix removed from every key when all keys have it")
    allow_pickle: bool = Field(False, description="allow a whole pickled nn.Module; unpickling runs code")
    input_shape: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [3, 224, 224], min_length=1, description="one example input, without the batch axis"
    )
    python_path: list[str] = Field(
        default_factory=list, description="folders added to sys.path to import the architecture and datasets"
    )


class RankRule(_Strict):
    """How to choose a rank in one mode: exactly one of fixed, ratio or energy."""

    fixed: Annotated[int, Field(gt=0)] | None = None
    ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    energy: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RankRule:
        present = [name for name in ("fixed", "ratio", "energy") if getattr(self, name) is not None]
        if len(present) != 1:
            raise ValueError(f"give exactly one of fixed, ratio or energy, found {present or 'none'}")
        return self


class TargetConfig(_Strict):
    """A budget for the whole model, as a share of the original's cost; give exactly one of macs, params, latency."""

    macs: Annotated[float, Field(gt=0, lt=1)] | None = Field(None, description="share of the original MACs per sample")
    params: Annotated[float, Field(gt=0, lt=1)] | None = Field(None, description="share of the original parameters")
    latency: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="share of the original's median onnxruntime latency at batch_size and threads")
    batch_size: Annotated[int, Field(gt=0)] = Field(32, description="batch size of the latency measurements")
    threads: Annotated[int, Field(gt=0)] = Field(1, description="onnxruntime intra-op threads of the latency measurements")
    latency_cache: str | None = Field(
        None, description="JSON file of per-layer latencies, relative to the recipe's folder; default "
                          "~/.cache/slimmer/latency.json or $SLIMMER_CACHE_DIR/latency.json")

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetConfig:
        given = [key for key in ("macs", "params", "latency") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of macs, params or latency, found {given or 'none'}")
        # Defaults pass, so a resolved recipe (which lists every field) validates again.
        unused = [key for key in ("batch_size", "threads", "latency_cache")
                  if getattr(self, key) != type(self).model_fields[key].default]
        if given != ["latency"] and unused:
            raise ValueError(f"{', '.join(unused)} apply to a latency target only; remove them for a {given[0]} target")
        return self

    @property
    def metric(self) -> str:
        return next(key for key in ("macs", "params", "latency") if getattr(self, key) is not None)

    @property
    def share(self) -> float:
        return float(getattr(self, self.metric))


class DecomposeConfig(_Strict):
    """Replace k x k convolutions by low-rank forms initialized from the trained weights.

    ``bottleneck`` is Tucker-2 with ranks from ``rank`` (or ``rank_in`` and ``rank_out``);
    ``separable`` is depthwise then pointwise with the channel multiplier from ``multiplier``;
    ``auto`` takes the bottleneck ranks as each layer's MAC budget. Per layer, it picks the form
    with the lower output error on calibration images at no more than those MACs. With ``target``
    the ranks (and, for ``auto``, the forms) are planned per layer to reach a model-wide budget.
    """

    form: Literal["bottleneck", "separable", "auto"] = "bottleneck"
    include: list[str] = Field(default_factory=lambda: ["*"], description="qualified-name glob patterns")
    exclude: list[str] = Field(default_factory=list)
    min_channels: Annotated[int, Field(ge=1)] = Field(8, description="skip layers with fewer input or output channels")
    min_macs: Annotated[int, Field(ge=0)] = Field(0, description="skip layers with fewer MACs per sample")
    rank: RankRule | None = Field(None, description="rule for both modes, unless rank_in or rank_out is given")
    rank_in: RankRule | None = None
    rank_out: RankRule | None = None
    round_to: Annotated[int, Field(ge=1)] = 8
    hooi_iterations: Annotated[int, Field(ge=0, le=100)] = 0
    multiplier: RankRule | None = Field(
        None, description="separable channel multiplier K: fixed, ratio of min(O, kh*kw), or the energy each input channel keeps")
    calibration_images: Annotated[int, Field(gt=0)] = Field(
        64, description="images on which form auto compares forms and a target plans the ranks")
    target: TargetConfig | None = Field(
        None, description="plan ranks and forms per layer to reach this share of the original cost")
    weigh_by_output: bool = Field(
        True, description="with a target, weigh each layer's error by its effect on the model output")
    weigh_images: Annotated[int, Field(gt=0)] = Field(64, description="calibration images for weigh_by_output")

    @model_validator(mode="after")
    def _ranks_given(self) -> DecomposeConfig:
        if self.target is not None:
            given = [key for key in ("rank", "rank_in", "rank_out", "multiplier") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"target plans the ranks, so {', '.join(given)} would be ignored; remove "
                                 f"{'it' if len(given) == 1 else 'them'} or remove target")
            return self
        if self.form == "separable":
            if self.multiplier is None:
                raise ValueError("form separable needs multiplier, for example {fixed: 2} or {energy: 0.9}")
            if self.rank or self.rank_in or self.rank_out:
                raise ValueError("rank, rank_in and rank_out apply to forms bottleneck and auto, not separable")
            return self
        if self.multiplier is not None:
            raise ValueError(f"multiplier applies to form separable only, found form {self.form}")
        if self.rank is None and (self.rank_in is None or self.rank_out is None):
            raise ValueError("give rank, or both rank_in and rank_out")
        if self.rank is not None and self.rank_in is not None and self.rank_out is not None:
            raise ValueError("rank would be ignored because rank_in and rank_out are both given; remove one of them")
        return self

    def rule_in(self) -> RankRule:
        return self.rank_in or self.rank  # type: ignore[return-value]

    def rule_out(self) -> RankRule:
        return self.rank_out or self.rank  # type: ignore[return-value]


class PruneConfig(_Strict):
    """Remove 1x1-convolution channels through torch-pruning's dependency graph."""

    targets: Literal["bottleneck", "all_1x1"] = Field(
        "bottleneck", description="internal channels of the new bottlenecks, or every 1x1 convolution"
    )
    ratio: Annotated[float, Field(ge=0, lt=1)] = Field(0.25, description="share of each group's channels to remove")
    importance: Literal["l1", "l2"] = "l2"
    round_to: Annotated[int, Field(ge=1)] = 8
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)


class FinetuneConfig(_Strict):
    """Brief training of the compressed model, distilled from the original one."""

    epochs: Annotated[float, Field(gt=0)] | None = Field(None, description="passes over the training set")
    steps: Annotated[int, Field(gt=0)] | None = Field(None, description="optimizer steps; overrides epochs")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = 0.01
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    distill: bool = True
    temperature: Annotated[float, Field(gt=0)] = 4.0
    distill_weight: Annotated[float, Field(ge=0, le=1)] = Field(
        0.9, description="weight of the distillation loss; cross-entropy gets the rest when labels exist"
    )
    batch_size: Annotated[int, Field(gt=0)] = 128
    threads: Annotated[int, Field(ge=0)] = Field(0, description="torch threads during training; 0 keeps torch's default")
    checkpoint_every: Annotated[int, Field(gt=0)] = Field(
        500, description="optimizer steps between checkpoints in the work folder (with an output folder only)")

    @model_validator(mode="after")
    def _budget_given(self) -> FinetuneConfig:
        if self.epochs is None and self.steps is None:
            raise ValueError("give epochs or steps")
        return self


class RefitConfig(_Strict):
    """Least-squares refit of each bottleneck's last layer so its output matches the original layer's."""

    images: Annotated[int, Field(gt=0)] = Field(256, description="calibration images taken from data.calibration or data.train")
    ridge: Annotated[float, Field(ge=0)] = Field(1e-3, description="ridge strength, relative to the mean feature energy")
    recalibrate_bn: bool = Field(True, description="recompute batch-norm statistics on the calibration images after the refit")
    batch_size: Annotated[int, Field(gt=0)] = 128


class DecomposeStep(_Strict):
    decompose: DecomposeConfig


class RefitStep(_Strict):
    refit: RefitConfig


class PruneStep(_Strict):
    prune: PruneConfig


class FinetuneStep(_Strict):
    finetune: FinetuneConfig


Step = Union[DecomposeStep, RefitStep, PruneStep, FinetuneStep]
STEP_TYPES: dict[str, type[_Strict]] = {
    "decompose": DecomposeStep, "refit": RefitStep, "prune": PruneStep, "finetune": FinetuneStep,
}

TRANSFORM_NAMES = (
    "to_tensor", "normalize", "resize", "center_crop", "random_crop", "random_resized_crop",
    "random_horizontal_flip", "grayscale",
)


class DatasetConfig(_Strict):
    """A dataset: an ImageFolder with a transform list, or a 'module:callable' that returns a Dataset."""

    image_folder: str | None = None
    transform: list[str | dict[str, Any]] = Field(default_factory=list)
    callable: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    limit: Annotated[int, Field(gt=0)] | None = Field(None, description="use only this many samples, spread over classes")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        if (self.image_folder is None) == (self.callable is None):
            raise ValueError("give exactly one of image_folder or callable")
        if self.callable is not None and self.transform:
            raise ValueError("transform applies to image_folder only; a callable builds its own transforms")
        for item in self.transform:
            if isinstance(item, str):
                name = item
            elif len(item) == 1:
                name = next(iter(item))
            else:
                name = None
            if name not in TRANSFORM_NAMES:
                raise ValueError(f"unknown transform {item!r}; expected one of {', '.join(TRANSFORM_NAMES)}")
        return self


class DataConfig(_Strict):
    train: DatasetConfig | None = None
    calibration: DatasetConfig | None = Field(None, description="images for refit; data.train when not given")
    val: DatasetConfig | None = None
    batch_size: Annotated[int, Field(gt=0)] = 256
    num_workers: Annotated[int, Field(ge=0)] = 0


class ParityConfig(_Strict):
    """Tolerance of the ONNX-versus-PyTorch check: pass when |onnx - torch| <= atol + rtol * |torch|."""

    atol: Annotated[float, Field(ge=0)] = 1e-4
    rtol: Annotated[float, Field(ge=0)] = 1e-3
    samples: Annotated[int, Field(gt=0)] = 64


class ExportConfig(_Strict):
    opset: Annotated[int, Field(ge=17)] = 17
    parity: ParityConfig = Field(default_factory=ParityConfig)


class LatencyConfig(_Strict):
    """onnxruntime latency protocol: warm-up runs, then timed runs, baseline and candidate interleaved."""

    enabled: bool = True
    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 32], min_length=1)
    threads: Annotated[int, Field(gt=0)] = 1
    warmup: Annotated[int, Field(ge=0)] = 10
    runs: Annotated[int, Field(ge=50)] = 50


class ReportConfig(_Strict):
    latency: LatencyConfig = Field(default_factory=LatencyConfig)


class Recipe(_Strict):
    """A whole recipe. ``base_dir`` is the folder relative paths are resolved against."""

    version: Literal[1] = RECIPE_VERSION
    name: str = "recipe"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    steps: list[Step] = Field(default_factory=list)
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    base_dir: str = Field(".", exclude=True)

    def resolve_path(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (Path(self.base_dir) / candidate).resolve()

    def dump_with_absolute_paths(self) -> dict[str, Any]:
        """Return the recipe as JSON data with ``model.python_path`` and each ``image_folder`` made absolute.

        Relative paths start at the recipe's folder, so a copy saved elsewhere, such as
        ``recipe.resolved.yaml`` in an output folder, needs them absolute to apply the same way.
        """
        resolved = self.model_dump(mode="json")
        resolved["model"]["python_path"] = [str(self.resolve_path(folder)) for folder in self.model.python_path]
        for name in ("train", "calibration", "val"):
            dataset = resolved["data"].get(name)
            if dataset is not None and dataset["image_folder"] is not None:
                dataset["image_folder"] = str(self.resolve_path(dataset["image_folder"]))
        return resolved

    def to_yaml(self) -> str:
        """Return the recipe as YAML, with its paths absolute (see :meth:`dump_with_absolute_paths`)."""
        return yaml.safe_dump(self.dump_with_absolute_paths(), sort_keys=False)


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [name for name in model.model_fields if name != "base_dir"]


def _format_location(location: tuple[Any, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(known)})"


def _field_model_at(location: tuple[Any, ...]) -> type[BaseModel] | None:
    """Find the schema class of the mapping at ``location``, for "did you mean" suggestions."""
    current: Any = Recipe
    for part in location:
        if isinstance(part, int) or current is None:
            continue
        if current is _StepsPlaceholder:
            step_type = STEP_TYPES.get(part)
            current = _model_in(step_type.model_fields[part].annotation) if step_type else None
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        current = _model_in(annotation)
        if part == "steps":
            current = _StepsPlaceholder
    return current if current is not _StepsPlaceholder else None


class _StepsPlaceholder:
    pass


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()) or ():
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _validate_steps(raw_steps: Any, problems: list[str]) -> list[Any] | None:
    """Check each step has exactly one known kind, so errors name the step kind, not the Union."""
    if not isinstance(raw_steps, list):
        problems.append(f"steps: expected a list of steps, found {type(raw_steps).__name__}")
        return None
    checked = []
    for index, step in enumerate(raw_steps):
        if not isinstance(step, dict) or len(step) != 1:
            problems.append(
                f"steps[{index}]: expected a mapping with one key ({', '.join(STEP_TYPES)}), found {step!r}"
            )
            continue
        kind = next(iter(step))
        if kind not in STEP_TYPES:
            problems.append(f"steps[{index}]: unknown step '{kind}'{_suggest(str(kind), list(STEP_TYPES))}")
            continue
        try:
            checked.append(STEP_TYPES[kind].model_validate(step))
        except ValidationError as error:
            problems.extend(_describe(error, step, prefix=("steps", index)))
            continue
        # Both are allowed, because overriding steps is the usual way to shorten a recipe that gives epochs.
        config = getattr(checked[-1], "finetune", None)
        if config is not None and config.epochs is not None and config.steps is not None:
            logger.warning("steps[%d].finetune gives both epochs (%g) and steps (%d): it trains for %d steps and "
                           "ignores epochs; remove one of them", index, config.epochs, config.steps, config.steps)
    return checked


def _document_location(document: Any, location: tuple[Any, ...]) -> tuple[Any, ...]:
    """Keep the parts of a pydantic error location that are keys or indexes in the document.

    The other parts are the names pydantic gives to the members of a union type (``str``,
    ``function-after[...]``), which the user never wrote.
    """
    document_parts = []
    node = document
    for part in location:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            continue
        document_parts.append(part)
    return tuple(document_parts)


def _describe(error: ValidationError, document: Any, prefix: tuple[Any, ...] = ()) -> list[str]:
    problems = []
    for item in error.errors():
        location = prefix + _document_location(document, tuple(item["loc"]))
        place = _format_location(location)
        if item["type"] == "extra_forbidden" and len(location) > len(prefix):
            key = str(location[-1])
            parent = _field_model_at(location[:-1])
            hint = _suggest(key, _known_keys(parent)) if parent else ""
            problems.append(f"{place}: unknown key{hint}")
        elif item["type"] == "value_error":
            problems.append(f"{place}: {item['msg'].removeprefix('Value error, ')}")
        else:
            problems.append(f"{place}: {item['msg']}, found {item.get('input')!r}")
    return problems


def recipe_from_dict(raw: Any, base_dir: str | Path = ".", source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; raise RecipeError listing every problem found."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"expected a mapping at the top level, found {type(raw).__name__}"], source)

    problems: list[str] = []
    body = dict(raw)
    raw_steps = body.pop("steps", [])
    steps = _validate_steps(raw_steps, problems)
    body.pop("base_dir", None)
    try:
        recipe = Recipe.model_validate({**body, "steps": []})
    except ValidationError as error:
        problems[:0] = _describe(error, body)
        recipe = None
    if problems:
        raise RecipeError(problems, source)

    assert recipe is not None and steps is not None
    recipe.steps = steps
    recipe.base_dir = str(Path(base_dir).resolve())
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file, applying ``key.path=value`` overrides first."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError([f"{path} is a folder, expected a YAML file"], "recipe")
    if not path.is_file():
        raise RecipeError([f"file not found: {path}; check the path"], "recipe")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())
        raise RecipeError([f"{path} is not valid YAML: {detail}"], "recipe") from None
    raw = apply_overrides(raw, overrides or [])
    try:
        return recipe_from_dict(raw, base_dir=path.parent, source=f"recipe {path}")
    except RecipeError as error:
        lines = _line_numbers(path.read_text(encoding="utf-8"))
        raise RecipeError([_with_line(problem, lines) for problem in error.problems], error.source) from None


def _line_numbers(text: str) -> dict[str, int]:
    """Map each place in a YAML document (``steps[1].rank.ratio``) to its 1-based line number."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}

    def visit(node: Any, place: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    child = f"{place}.{key_node.value}" if place else str(key_node.value)
                    lines.setdefault(child, key_node.start_mark.line + 1)
                    visit(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = f"{place}[{index}]"
                lines.setdefault(child, item.start_mark.line + 1)
                visit(item, child)

    if root is not None:
        visit(root, "")
    return lines


def _with_line(problem: str, lines: dict[str, int]) -> str:
    place = problem.split(": ", 1)[0]
    return f"{problem} (line {lines[place]})" if place in lines else problem


def apply_overrides(raw: Any, overrides: list[str]) -> Any:
    """Set ``a.b[0].c=value`` entries on a raw recipe mapping; values are parsed as YAML."""
    if not overrides:
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"expected a mapping at the top level, found {type(raw).__name__}"])
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key:
            raise RecipeError([f"override {override!r} is not key=value (for example seed=1)"], "override")
        _set_path(raw, key, _override_value(text, override), override)
    return raw


def _override_value(text: str, override: str) -> Any:
    """Parse the value of an override as YAML; an empty value is null."""
    if not text:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        parts = [getattr(error, "context", None), getattr(error, "problem", None)]
        detail = ": ".join(part for part in parts if part) or " ".join(str(error).split())
        raise RecipeError([f"override {override!r}: the value {text!r} is not valid YAML ({detail}); close its "
                           "brackets, braces and quotes, or put a string that starts with one of them in YAML quotes, "
                           "as in 'name=\"[draft]\"'"], "override") from None


def _set_path(raw: dict[str, Any], key: str, value: Any, override: str) -> None:
    parts: list[str | int] = []
    for token in key.replace("]", "").split("."):
        name, *indexes = token.split("[")
        if name:
            parts.append(name)
        for index in indexes:
            if not index.isdigit():
                raise RecipeError([f"override {override!r}: index {index!r} is not a number"], "override")
            parts.append(int(index))

    node: Any = raw
    for part, following in zip(parts[:-1], parts[1:]):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError([f"override {override!r}: no list item [{part}] in the recipe"], "override")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError([f"override {override!r}: '{part}' is not inside a mapping"], "override")
            node = node.setdefault(part, [] if isinstance(following, int) else {})
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError([f"override {override!r}: no list item [{last}] in the recipe"], "override")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError([f"override {override!r}: '{last}' is not inside a mapping"], "override")
