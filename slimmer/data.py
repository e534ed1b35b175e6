"""Datasets a recipe can name: a torchvision ImageFolder with a transform list, or a callable."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from slimmer.errors import DataError, SlimmerError
from slimmer.model_io import import_callable
from slimmer.recipe import DataConfig, DatasetConfig

logger = logging.getLogger(__name__)


def build_transform(spec: list[str | dict[str, Any]]):
    """Turn ``[to_tensor, {normalize: {mean: ..., std: ...}}, ...]`` into a torchvision Compose."""
    from torchvision import transforms

    builders = {
        "to_tensor": transforms.ToTensor,
        "normalize": transforms.Normalize,
        "resize": transforms.Resize,
        "center_crop": transforms.CenterCrop,
        "random_crop": transforms.RandomCrop,
        "random_resized_crop": transforms.RandomResizedCrop,
        "random_horizontal_flip": transforms.RandomHorizontalFlip,
        "grayscale": transforms.Grayscale,
    }
    steps = []
    for item in spec:
        name, arguments = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        arguments = arguments or {}
        try:
            steps.append(builders[name](**arguments) if isinstance(arguments, dict) else builders[name](arguments))
        except (TypeError, ValueError) as error:
            raise DataError(f"transform {name} rejected its arguments {arguments!r}: {error}") from None
    return transforms.Compose(steps)


def load_image(path: str) -> Any:
    """Open an image as torchvision's ImageFolder does; raise DataError naming a file that cannot be read."""
    from PIL import UnidentifiedImageError
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: unknown or corrupt image format; replace or remove the file") from None
    except OSError as error:
        raise DataError(f"cannot read image {path}: {error}; replace or remove the file") from None


def _limit(dataset: Dataset, limit: int, seed: int) -> Dataset:
    """Keep ``limit`` samples spread evenly over the classes when the targets are known."""
    if limit >= len(dataset):
        return dataset
    targets = getattr(dataset, "targets", None)
    generator = torch.Generator().manual_seed(seed)
    if targets is None:
        indices = torch.randperm(len(dataset), generator=generator)[:limit].tolist()
        return Subset(dataset, sorted(indices))
    by_class: dict[Any, list[int]] = defaultdict(list)
    for index in torch.randperm(len(dataset), generator=generator).tolist():
        by_class[int(targets[index])].append(index)
    chosen: list[int] = []
    while len(chosen) < limit:
        for indices in by_class.values():
            if indices and len(chosen) < limit:
                chosen.append(indices.pop())
    return Subset(dataset, sorted(chosen))


def build_dataset(config: DatasetConfig, resolve, search_path: list[Path], seed: int = 0, label: str = "data") -> Dataset:
    """Build the dataset ``config`` names; ``resolve`` turns recipe paths into absolute ones."""
    if config.image_folder is not None:
        from torchvision.datasets import ImageFolder

        root = resolve(config.image_folder)
        if not root.is_dir():
            raise DataError(f"{label}.image_folder not found: {root}; check the path (relative paths start at the recipe's folder)")
        try:
            dataset: Dataset = ImageFolder(str(root), transform=build_transform(config.transform), loader=load_image)
        except (FileNotFoundError, RuntimeError) as error:
            raise DataError(f"{label}.image_folder {root} is not an ImageFolder (one sub-folder per class): {error}") from None
    else:
        assert config.callable is not None
        try:
            builder = import_callable(config.callable, search_path, f"{label}.callable")
        except SlimmerError as error:
            raise DataError(str(error)) from None
        try:
            dataset = builder(**config.kwargs)
        except Exception as error:  # a user callable can raise anything; report it as bad data input
            raise DataError(f"{label}.callable {config.callable!r} failed: {type(error).__name__}: {error}") from None
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise DataError(f"{label}.callable {config.callable!r} returned {type(dataset).__name__}, not a Dataset")
    if len(dataset) == 0:
        raise DataError(f"{label} is empty")
    if config.limit is not None:
        dataset = _limit(dataset, config.limit, seed)
    return dataset


def make_loader(dataset: Dataset, data: DataConfig, batch_size: int | None = None, shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size or data.batch_size, shuffle=shuffle,
                      num_workers=data.num_workers, generator=generator, drop_last=False)


def check_sample_shape(dataset: Dataset, input_shape: list[int], label: str) -> None:
    """Raise DataError unless the first sample's input is a tensor of shape ``input_shape``."""
    inputs, _ = split_batch(dataset[0])
    if not isinstance(inputs, torch.Tensor):
        raise DataError(f"{label} gives inputs of type {type(inputs).__name__}, expected tensors; "
                        "add to_tensor to its transform")
    if list(inputs.shape) != list(input_shape):
        raise DataError(f"{label} gives inputs of shape {list(inputs.shape)}, but model.input_shape is "
                        f"{list(input_shape)}; change the transform (for example grayscale or resize) or model.input_shape")


def check_label_range(dataset: Dataset, classes: int, label: str) -> None:
    """Raise DataError when the dataset's ``targets`` (as ImageFolder lists them) reach past the model's classes.

    A dataset without a ``targets`` list is not checked here; fine-tuning checks each batch.
    """
    targets = getattr(dataset, "targets", None)
    if not targets or not all(isinstance(target, int) for target in targets):
        return
    if min(targets) < 0 or max(targets) >= classes:
        raise DataError(f"{label} has labels from {min(targets)} to {max(targets)}, but the model outputs {classes} "
                        "classes; check the class folders or the model's class count")


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(inputs, labels or None)`` from a batch that is a tensor or an ``(inputs, labels, ...)`` pair."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch:
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict) and "input" in batch:
        return batch["input"], batch.get("label")
    raise DataError(f"cannot find inputs in a batch of type {type(batch).__name__}; "
                    "return (image, label) pairs or image tensors from the dataset")


@torch.no_grad()
def evaluate_top1(model: torch.nn.Module, loader: DataLoader) -> float | None:
    """Compute top-1 accuracy in percent, or return None when the data has no labels."""
    model.eval()
    correct = 0
    total = 0
    for batch in loader:
        inputs, labels = split_batch(batch)
        if labels is None:
            return None
        correct += (model(inputs).argmax(1) == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def sample_inputs(dataset: Dataset | None, count: int, input_shape: list[int], seed: int = 0) -> torch.Tensor:
    """Take ``count`` evenly spaced inputs from ``dataset``, or seeded random ones when there is no dataset."""
    if dataset is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((count, *input_shape), generator=generator)
    step = max(len(dataset) // count, 1)
    items = [split_batch(dataset[index])[0] for index in range(0, len(dataset), step)[:count]]
    return torch.stack(items).float()

