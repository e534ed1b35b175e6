"""A small CNN of 3x3 convolutions and scikit-learn's bundled handwritten digits (8x8 grayscale, 10 classes).

Used by the embedded demo and by tests: it needs nothing but the installed packages.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

DIGITS_MEAN = 4.88
DIGITS_STD = 6.02


class DigitsCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers, a 2x2 max pool after the second, global average pool, linear.

    Input ``(N, 1, 8, 8)``; output logits ``(N, 10)``.
    """

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def digits_cnn(width: int = 32) -> DigitsCNN:
    return DigitsCNN(width)


def digits_dataset(split: str = "train", val_share: float = 0.25, seed: int = 0) -> TensorDataset:
    """Load the digits as standardized ``(image (1, 8, 8), label)`` pairs from a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', found {split!r}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    images = (images - DIGITS_MEAN) / DIGITS_STD
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_index, val_index = train_test_split(
        list(range(len(labels))), test_size=val_share, random_state=seed, stratify=digits.target)
    chosen = train_index if split == "train" else val_index
    dataset = TensorDataset(images[chosen], labels[chosen])
    dataset.targets = labels[chosen].tolist()
    return dataset


def train_digits_cnn(epochs: int = 15, seed: int = 0, width: int = 32) -> DigitsCNN:
    """Train :class:`DigitsCNN` on the training split (a few seconds on a CPU)."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    loader = torch.utils.data.DataLoader(digits_dataset("train", seed=seed), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()
