"""The values a sweep's grid shares across layers: a cell's key and a subnet's target window.

A *cell* is one (method, FLOPs target, KD weight) of the grid; its string form
(``ast_f0.5_kd0.9``) names cache folders, MLflow runs and metrics. A subnet's *target window* is
``[0.9, 1] x target`` MACs: every method reports a subnet inside it, and orchestrators record
where it landed. Both are defined here once, in pure Python, so that methods, orchestration and
tracking agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["WINDOW_LOW", "CellKey", "TargetWindow"]

#: A reported subnet should have at least this fraction of its target's MACs.
WINDOW_LOW = 0.9


@dataclass(frozen=True)
class CellKey:
    """One grid cell: a method at one FLOPs target (a fraction of the unpruned MACs) and one KD weight."""

    method: str
    flops_target: float
    kd_weight: float

    def __str__(self) -> str:
        """The cell's name, safe in paths and MLflow keys: ``ast_f0.5_kd0.9``."""
        return f"{self.method}_f{self.flops_target:g}_kd{self.kd_weight:g}"


@dataclass(frozen=True)
class TargetWindow:
    """The MACs a subnet reported for a FLOPs target should have: ``[low * target, target]``."""

    target_macs: float
    low: float = WINDOW_LOW

    @property
    def low_macs(self) -> float:
        """The least MACs inside the window."""
        return self.low * self.target_macs

    def contains(self, macs: float) -> bool:
        """Whether ``macs`` lies in the window (both ends included)."""
        return self.low_macs <= macs <= self.target_macs

    def status(self, macs: float) -> str:
        """``in_window``, ``below_window`` (a method settled on a smaller subnet) or ``over_target``."""
        if self.contains(macs):
            return "in_window"
        return "over_target" if macs > self.target_macs else "below_window"

    def record(self, macs: float) -> dict[str, Any]:
        """Where ``macs`` lands, as a subnet record stores it (``source["window"]``)."""
        return {
            "low": int(self.low_macs),
            "high": int(self.target_macs),
            "fraction_of_target": macs / self.target_macs,
            "status": self.status(macs),
        }

    @staticmethod
    def describe(target: str = "target") -> str:
        """The window in words, for messages: ``[0.9, 1] x target`` (``target`` names the target)."""
        return f"[{WINDOW_LOW:g}, 1] x {target}"
