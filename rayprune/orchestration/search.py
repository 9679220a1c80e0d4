"""Which trials a sweep runs: one seeded Optuna study per grid cell, and per-cell ASHA.

:class:`CellSearcher` is a Ray Tune ``Searcher``. A sweep's grid has one *cell* per (method,
FLOPs target, KD weight); each cell gets exactly ``samples_per_cell`` trials, handed out round
robin so every cell progresses together. Inside a cell an Optuna study picks the trial's
per-stage maximum pruning rates (``max_stage_prune``) from the cell's earlier results: it
maximises the search-val accuracy of the trial's chosen subnet, with the achieved MACs as a
constraint (``macs / target - 1 <= 0``, Optuna 5 ``Trial.set_constraint``).

Why not Ray's ``OptunaSearch``: it keeps one study, never passes measured MACs to the
constraint, and tells scheduler-stopped trials to Optuna as COMPLETE with a truncated accuracy.
Here only trials that report their final result (``FINAL_KEY``) are COMPLETE; stopped ones are
PRUNED, crashed ones FAIL. Budgets that cannot reach the cell's target are never run: they are
told to Optuna as infeasible at once and redrawn.

:class:`PerCellASHA` runs one ASHA bracket per cell, because trials of a 0.3-FLOPs cell must
not be stopped for being less accurate than those of a 0.9-FLOPs cell.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from .. import models
from ..methods import Budget
from ..models.base import Spec
from .config import Cell
from .trial_spec import TrialSpec, sample_config

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

FINAL_KEY = "final"  # present (truthy) only in a trial's last, post-finalize report
METRIC = "val_top1"  # what Optuna maximises and ASHA compares: search-val accuracy, never test
Feasibility = Callable[[float, list[float]], float]  # (flops_target, rates) -> violation (<= 0: reachable)


class _PickledState:
    """``save``/``restore`` of the whole object state, as Tune calls them on experiment snapshots."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class CellSearcher(_PickledState, Searcher):
    """One seeded Optuna study per grid cell choosing ``max_stage_prune``.

    Args:
        cells: the grid cells, in a fixed order (it fixes the round robin and the seeds).
        samples_per_cell: trials per cell; ``suggest`` returns FINISHED after all of them.
        stage_ranges: per stage, the ``(low, high)`` range of the maximum pruning rate.
        sampler: ``tpe``, ``random``, ``gp`` or ``nsga2``.
        seed: the sweep's seed; cell ``i``'s sampler is seeded from ``(seed, i)``.
        n_startup_trials: random trials per cell before TPE/GP model the results.
        feasibility: ``(flops_target, rates) -> violation``; a budget with violation > 0 cannot
            reach the target and is redrawn (see :class:`Reachability`). None: every budget runs.
        max_redraws: draws per suggestion before falling back to the loosest budget.
    """

    def __init__(
        self,
        cells: Sequence[Cell],
        samples_per_cell: int,
        stage_ranges: Sequence[tuple[float, float]],
        *,
        sampler: str = "tpe",
        seed: int = 0,
        n_startup_trials: int = 4,
        feasibility: Feasibility | None = None,
        max_redraws: int = 20,
    ) -> None:
        super().__init__(metric=METRIC, mode="max")
        if samples_per_cell < 1:
            raise ValueError(f"samples_per_cell must be >= 1, got {samples_per_cell}")
        self.cells = list(cells)
        self.samples_per_cell = samples_per_cell
        self.stage_ranges = [tuple(map(float, r)) for r in stage_ranges]
        self.feasibility = feasibility
        self.max_redraws = max_redraws
        self.studies = [_make_study(sampler, _cell_seed(seed, i), n_startup_trials) for i in range(len(self.cells))]
        self.suggested = [0] * len(self.cells)
        self.pending: dict[str, tuple[int, optuna.trial.Trial]] = {}  # tune trial id -> (cell, optuna trial)

    # -- Searcher API ----------------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the metric is fixed (METRIC, max); the space is ours

    def suggest(  # type: ignore[override]  # Ray's hint omits the str Searcher.FINISHED it documents
        self, trial_id: str
    ) -> dict[str, Any] | str:
        index = self._next_cell()
        if index is None:
            return Searcher.FINISHED
        cell = self.cells[index]
        trial, rates = self._draw(index, cell)
        self.suggested[index] += 1
        self.pending[trial_id] = (index, trial)
        return sample_config(index, cell.key, rates, trial.number)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entry = self.pending.pop(trial_id, None)
        if entry is None:  # not ours, or already told (e.g. an errored trial restarted on resume)
            return
        index, trial = entry
        study = self.studies[index]
        if error:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif not result or not result.get(FINAL_KEY) or self.metric not in result:
            # Stopped early (scheduler) or ended without a final result: its accuracy is truncated.
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            trial.set_constraint("macs", _violation(result["flops_fraction"], self.cells[index].flops_target))
            study.tell(trial, float(result[self.metric]))

    # -- internals -------------------------------------------------------------------------------
    def _next_cell(self) -> int | None:
        """Round robin: the first cell with the fewest suggestions, until each has its quota."""
        index = min(range(len(self.cells)), key=lambda i: (self.suggested[i], i), default=None)
        if index is None or self.suggested[index] >= self.samples_per_cell:
            return None
        return index

    def _draw(self, index: int, cell: Cell) -> tuple[optuna.trial.Trial, list[float]]:
        """Ask the cell's study for rates; tell unreachable ones as infeasible and redraw."""
        study = self.studies[index]
        for _ in range(self.max_redraws):
            trial = study.ask()
            rates = self._suggest_rates(trial)
            violation = self.feasibility(cell.flops_target, rates) if self.feasibility else 0.0
            if violation <= 0:
                return trial, rates
            trial.set_constraint("macs", violation)
            study.tell(trial, 0.0)  # never runs: the smallest subnet it allows is over the target
        study.enqueue_trial({_param(s): high for s, (_, high) in enumerate(self.stage_ranges)})
        trial = study.ask()
        return trial, self._suggest_rates(trial)

    def _suggest_rates(self, trial: optuna.trial.Trial) -> list[float]:
        return [trial.suggest_float(_param(s), low, high) for s, (low, high) in enumerate(self.stage_ranges)]

    def trials_per_cell(self) -> list[int]:
        """How many trials each cell has been given so far."""
        return list(self.suggested)


def _param(stage: int) -> str:
    return f"max_prune_stage{stage}"


def _violation(flops_fraction: float, flops_target: float) -> float:
    return float(flops_fraction) / flops_target - 1.0


def _cell_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919) % (2**31 - 1)


def _make_study(sampler: str, seed: int, n_startup_trials: int) -> optuna.Study:
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, n_startup_trials)),
    }
    if sampler not in samplers:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(samplers)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", sampler=samplers[sampler]())


class Reachability:
    """Feasibility of a budget for a model: how far the smallest subnet it allows is over the
    target (``smallest / target - 1``; <= 0 means reachable). Picklable (a spec and a size)."""

    def __init__(self, full_spec: Spec, input_size: int | None = None) -> None:
        self.full_spec = full_spec
        self.input_size = input_size

    def __call__(self, flops_target: float, rates: list[float]) -> float:
        budget = Budget(flops_target=flops_target, max_stage_prune=rates)
        floor = models.with_widths(self.full_spec, budget.min_widths(self.full_spec))
        smallest = models.macs(floor, self.input_size) / models.macs(self.full_spec, self.input_size)
        return _violation(smallest, flops_target)


class PerCellASHA(_PickledState, FIFOScheduler):
    """ASHA early stopping on ``val_top1`` with one bracket per grid cell (:attr:`.TrialSpec.cell_index`).

    Trials are only ever compared with trials of the same cell. ``stop_last_trials`` is off: a
    trial that reaches ``max_t`` still finishes and reports its final (fine-tuned) result.
    Which trial belongs to which cell's ASHA, and how many were stopped, is kept here, through
    the ASHAs' public scheduler calls only.
    """

    def __init__(self, *, grace_period: int = 1, reduction_factor: float = 4.0, max_t: int = 10_000) -> None:
        super().__init__()
        self._kwargs: dict[str, Any] = dict(
            time_attr="training_iteration",
            metric=METRIC,
            mode="max",
            max_t=max_t,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            stop_last_trials=False,
        )
        self._by_cell: dict[int, AsyncHyperBandScheduler] = {}
        self._cell_of: dict[str, int] = {}  # trial id -> the cell whose ASHA has it registered
        self._stopped = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A scheduler pickled by rayprune 0.1 (a sweep interrupted under that version) has neither field.
        self.__dict__.update({"_cell_of": {}, "_stopped": 0, **state})

    @property
    def metric(self) -> str:
        return METRIC

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _asha(self, tune_controller: TuneController, trial: Trial) -> AsyncHyperBandScheduler:
        """The trial's cell's ASHA, with the trial registered (restored trials may not be yet)."""
        cell = TrialSpec.from_config(trial.config).cell_index
        if cell not in self._by_cell:
            self._by_cell[cell] = AsyncHyperBandScheduler(**self._kwargs)
        asha = self._by_cell[cell]
        if trial.trial_id not in self._cell_of:
            asha.on_trial_add(tune_controller, trial)
            self._cell_of[trial.trial_id] = cell
        return asha

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        self._asha(tune_controller, trial)

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        if result.get(FINAL_KEY):
            return TrialScheduler.CONTINUE  # the final report is never a reason to stop
        decision = self._asha(tune_controller, trial).on_trial_result(tune_controller, trial, result)
        self._stopped += decision == TrialScheduler.STOP
        return decision

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial, result: dict) -> None:
        self._asha(tune_controller, trial).on_trial_complete(tune_controller, trial, result)
        self._cell_of.pop(trial.trial_id, None)  # done: no result or removal follows

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        cell = self._cell_of.pop(trial.trial_id, None)
        if cell is not None:
            self._by_cell[cell].on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"Using per-cell ASHA ({len(self._by_cell)} cells): num_stopped={self._stopped}"
