"""Choosing Tucker-2 ranks from a recipe rule: fixed, a ratio of the channels, or spectral energy."""

from __future__ import annotations

import math

import torch

from slimmer.recipe import RankRule


def round_rank(value: float, round_to: int, channels: int, up: bool = False) -> int:
    """Round to a multiple of ``round_to`` (nearest, or up), at least ``round_to``, clamped to ``[1, channels]``."""
    steps = math.ceil(value / round_to - 1e-9) if up else math.floor(value / round_to + 0.5)
    return int(min(max(steps, 1) * round_to, channels))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose leading singular values keep ``energy`` of the squared total (1 for a zero tensor)."""
    squared = singular_values.double() ** 2
    total = squared.sum()
    if total <= 0:
        return 1
    cumulative_share = torch.cumsum(squared, 0) / total
    threshold = torch.tensor(energy - 1e-12, dtype=cumulative_share.dtype)
    return int(torch.searchsorted(cumulative_share, threshold).item()) + 1


def choose_rank(rule: RankRule, channels: int, singular_values: torch.Tensor | None, round_to: int) -> int:
    """Apply ``rule`` to one mode with ``channels`` channels; the result lies in ``[1, channels]``.

    ``singular_values`` of the mode are required by an energy rule only.
    """
    if rule.fixed is not None:
        return round_rank(rule.fixed, round_to, channels)
    if rule.ratio is not None:
        return round_rank(rule.ratio * channels, round_to, channels)
    assert rule.energy is not None and singular_values is not None
    return round_rank(energy_rank(singular_values, rule.energy), round_to, channels, up=True)
