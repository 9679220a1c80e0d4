"""What the sweep driver hands one Tune trial, typed: :class:`TrialSpec`.

On the wire a trial's config stays a plain dict, because Tune merges the driver's
``param_space`` (:func:`shared_config`: what every trial shares) with the searcher's suggestion
(:func:`sample_config`: the trial's cell and budget), and stores the result in checkpoints and
its experiment state, which a resumed sweep reads back. Those two functions are the only
writers of its keys and :meth:`TrialSpec.from_config` the only reader: every entry point (the
trainable, the driver's callback, the scheduler, the cell fine-tunes) parses the dict once and
reads attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..grid import CellKey
from ..runner import TrialConfig

__all__ = ["FINAL_KEY", "METRIC", "TrialSpec", "sample_config", "shared_config"]

FINAL_KEY = "final"  # present (truthy) only in a trial's last, post-finalize report
METRIC = "val_top1"  # search-val accuracy (never test): ASHA compares it; the objective is its gain


def shared_config(
    base: dict[str, Any], hparams: dict[str, dict[str, Any]], cpus_per_trial: float, final_cache: str | None
) -> dict[str, Any]:
    """The part of the config every trial of a sweep shares (Tune's ``param_space``).

    ``base`` holds the :class:`~rayprune.runner.TrialConfig` fields that do not vary per trial
    (its ``seed`` is the sweep's); ``hparams`` maps each method to its hyperparameters."""
    return {"base": base, "hparams": hparams, "cpus_per_trial": cpus_per_trial, "final_cache": final_cache}


def sample_config(
    cell_index: int,
    cell: CellKey,
    max_stage_prune: list[float],
    optuna_number: int,
    allocation: list[float] | None = None,
) -> dict[str, Any]:
    """The part the searcher chooses per trial: the grid cell (its index and key) and the budget
    (``allocation``: the per-stage shares, summing to 1, for methods that take one; else no key)."""
    config = {
        "cell": cell_index,
        "method": cell.method,
        "flops_target": cell.flops_target,
        "kd_weight": cell.kd_weight,
        "max_stage_prune": max_stage_prune,
        "optuna_number": optuna_number,
    }
    if allocation is not None:
        config["allocation"] = allocation
    return config


@dataclass(frozen=True)
class TrialSpec:
    """One Tune trial's config, parsed: the grid cell, the budget, and the run's settings."""

    base: Mapping[str, Any]  # TrialConfig fields shared by every trial; seed: the sweep's
    hparams: Mapping[str, Mapping[str, Any]]  # method name -> its hyperparameters
    cell_index: int  # the cell's position in the grid (one Optuna study and one ASHA bracket each)
    method: str
    flops_target: float
    kd_weight: float
    max_stage_prune: tuple[float, ...]
    optuna_number: int  # the trial's number in its cell's study; offsets the seed
    allocation: tuple[float, ...] | None = None  # per-stage shares of the pruning; None: the method's own
    cpus_per_trial: float = 1
    final_cache: str | None = None  # root of the sweep's FinalCache; None: no cache

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrialSpec:
        """Parse a trial's Tune config (a sweep saved by an older rayprune may lack the optional keys)."""
        return cls(
            base=dict(config["base"]),
            hparams=dict(config["hparams"]),
            cell_index=int(config["cell"]),
            method=str(config["method"]),
            flops_target=float(config["flops_target"]),
            kd_weight=float(config["kd_weight"]),
            max_stage_prune=tuple(float(r) for r in config["max_stage_prune"]),
            optuna_number=int(config["optuna_number"]),
            allocation=None if config.get("allocation") is None else tuple(float(a) for a in config["allocation"]),
            cpus_per_trial=float(config.get("cpus_per_trial", 1)),
            final_cache=config.get("final_cache"),
        )

    @property
    def cell(self) -> CellKey:
        """The grid cell's key; its string form names the trial, its cache folder and its runs."""
        return CellKey(self.method, self.flops_target, self.kd_weight)

    @property
    def seed(self) -> int:
        """The run's seed: the sweep's, offset by the Optuna trial number (each trial differs)."""
        return int(self.base.get("seed", 0)) + self.optuna_number

    @property
    def method_hparams(self) -> dict[str, Any]:
        """The hyperparameters of this trial's method."""
        return dict(self.hparams.get(self.method, {}))

    def trial_config(self) -> TrialConfig:
        """The :class:`~rayprune.runner.TrialConfig` of the method run this trial drives."""
        shared = {k: v for k, v in self.base.items() if k != "seed"}
        return TrialConfig(
            **shared,
            method=self.method,
            hparams=self.method_hparams,
            flops_target=self.flops_target,
            kd_weight=self.kd_weight,
            max_stage_prune=list(self.max_stage_prune),
            allocation=None if self.allocation is None else list(self.allocation),
            seed=self.seed,
        )
