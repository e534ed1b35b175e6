"""Records that every pass returns: what it rewrote, what it skipped and why, and the cost change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class LayerChange:
    """One layer a pass rewrote, by qualified name, with the shapes or ranks before and after."""

    name: str
    before: str
    after: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerSkip:
    """One candidate layer a pass left alone, with the reason in words."""

    name: str
    reason: str


@dataclass
class PassResult:
    """The model a pass produced and the record of what it did."""

    pass_name: str
    model: nn.Module
    changed: list[LayerChange] = field(default_factory=list)
    skipped: list[LayerSkip] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "changed": [vars(change) for change in self.changed],
            "skipped": [vars(skip) for skip in self.skipped],
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any], model: nn.Module) -> PassResult:
        """Rebuild a result from :meth:`to_dict`'s record, around ``model``."""
        return cls(
            record["pass"],
            model,
            [LayerChange(**change) for change in record["changed"]],
            [LayerSkip(**skip) for skip in record["skipped"]],
            dict(record["stats"]),
        )
