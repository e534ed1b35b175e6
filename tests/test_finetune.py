"""Fine-tuning: a diverging loss stops the run with CheckFailedError, normal training does not."""

from __future__ import annotations

import pytest
from torch import nn
from torch.utils.data import DataLoader

from examples.digits import digits_dataset
from slimmer.errors import CheckFailedError
from slimmer.finetune import DIVERGENCE_WINDOW, _check_not_diverging, finetune
from slimmer.recipe import FinetuneConfig

CONFIG = FinetuneConfig(steps=40, lr=0.01)


def digits_loader() -> DataLoader:
    return DataLoader(digits_dataset("train"), batch_size=32, shuffle=False)


def test_huge_lr_diverges_without_nan(digits_model: nn.Module) -> None:
    config = FinetuneConfig(steps=40, batch_size=32, optimizer="sgd", lr=1e6, distill=False)

    with pytest.raises(CheckFailedError) as raised:
        finetune(digits_model, config, digits_loader(), progress=False)

    message = str(raised.value)
    assert message.startswith("fine-tuning diverged: the mean loss of step")
    assert "nan" not in message
    assert message.endswith("; lower finetune.lr (now 1e+06)")


def test_normal_lr_trains(digits_model: nn.Module) -> None:
    config = FinetuneConfig(steps=40, batch_size=32, optimizer="adamw", lr=0.001, distill=False)

    result = finetune(digits_model, config, digits_loader(), progress=False)

    assert result.stats["steps"] == 40
    assert result.stats["last_loss"] < 10 * result.stats["first_loss"]


def test_growing_loss_flagged() -> None:
    losses = [0.3] + [50.0] * DIVERGENCE_WINDOW

    with pytest.raises(CheckFailedError, match=r"the mean loss of steps 2 to 21 is 50, over 10 times the loss "
                                               r"before the first update \(0\.3\)"):
        _check_not_diverging(losses, 10, CONFIG)


def test_single_spike_tolerated() -> None:
    # The small last batch of an epoch can give one loss far above the rest.
    _check_not_diverging([0.3] * DIVERGENCE_WINDOW + [30.0], 10, CONFIG)


def test_small_rise_from_near_zero_tolerated() -> None:
    # 100 times the first loss, but still far below ln(10), the loss of a uniform guess.
    _check_not_diverging([1e-3] + [0.1] * DIVERGENCE_WINDOW, 10, CONFIG)


def test_first_loss_alone_not_checked() -> None:
    _check_not_diverging([1e9], 10, CONFIG)
