"""Which trials a sweep runs: one seeded Optuna study per grid cell, and per-cell ASHA.

:class:`CellSearcher` is a Ray Tune ``Searcher``. A sweep's grid has one *cell* per (method,
FLOPs target, KD weight); each cell gets exactly its quota of trials (``samples_per_cell``, or
one: see below), handed out round robin so every cell progresses together. Inside a cell an
Optuna study picks the trial's budget from the cell's earlier results: it maximises the
search-val accuracy of the trial's chosen subnet, with the achieved MACs as a constraint
(``macs / target - 1 <= 0``, Optuna 5 ``Trial.set_constraint``). What it picks follows the
method's :attr:`~rayprune.methods.base.Method.budget_use`:

* ``max_rates`` (AST, TAS, SP): the per-stage maximum pruning rates (``max_prune_stage{i}``);
* ``allocation`` (l1, fpgm, random): those, and the per-stage allocation (``alloc_stage{i}`` in
  [0, 1], normalised to shares): with a global ranking the maximum rates rarely bind, so trials
  under different rates would mostly choose one subnet; the allocation moves it;
* ``target`` (uniform): nothing. The FLOPs target alone fixes its subnet, so its cell runs one
  trial (not ``samples_per_cell``), with the loosest maximum rates.

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
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from .. import models
from ..methods import Budget
from ..methods.base import BudgetUse
from ..models.base import Spec
from .config import Cell, cell_quota
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
    """One seeded Optuna study per grid cell choosing the trial's budget (see the module docstring).

    Args:
        cells: the grid cells, in a fixed order (it fixes the round robin and the seeds).
        samples_per_cell: trials per cell (one for a ``target`` method's cell); ``suggest``
            returns FINISHED after all of them.
        stage_ranges: per stage, the ``(low, high)`` range of the maximum pruning rate.
        budget_use: per method, what its study chooses (:attr:`.Method.budget_use`); a method
            not named gets ``max_rates``.
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
        budget_use: Mapping[str, BudgetUse] | None = None,
    ) -> None:
        super().__init__(metric=METRIC, mode="max")
        if samples_per_cell < 1:
            raise ValueError(f"samples_per_cell must be >= 1, got {samples_per_cell}")
        self.cells = list(cells)
        self.samples_per_cell = samples_per_cell
        self.stage_ranges = [tuple(map(float, r)) for r in stage_ranges]
        self.feasibility = feasibility
        self.max_redraws = max_redraws
        self.budget_use: dict[str, BudgetUse] = dict(budget_use or {})
        self.studies = [_make_study(sampler, _cell_seed(seed, i), n_startup_trials) for i in range(len(self.cells))]
        self.suggested = [0] * len(self.cells)
        self.pending: dict[str, tuple[int, optuna.trial.Trial]] = {}  # tune trial id -> (cell, optuna trial)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A searcher pickled by rayprune 0.1 (an interrupted sweep resumed now) has no budget_use:
        # its trials keep choosing the maximum rates only.
        self.__dict__.update({"budget_use": {}, **state})

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
        trial, rates, allocation = self._draw(index, cell)
        self.suggested[index] += 1
        self.pending[trial_id] = (index, trial)
        return sample_config(index, cell.key, rates, trial.number, allocation)

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
    def _use(self, cell: Cell) -> BudgetUse:
        return self.budget_use.get(cell.method, "max_rates")

    def _next_cell(self) -> int | None:
        """Round robin: the first cell with the fewest suggestions among those below their quota."""
        quotas = [cell_quota(self._use(cell), self.samples_per_cell) for cell in self.cells]
        open_cells = [i for i, quota in enumerate(quotas) if self.suggested[i] < quota]
        return min(open_cells, key=lambda i: (self.suggested[i], i), default=None)

    def _draw(self, index: int, cell: Cell) -> tuple[optuna.trial.Trial, list[float], list[float] | None]:
        """Ask the cell's study for a budget ``(trial, rates, allocation)``; tell unreachable ones as
        infeasible and redraw. A ``target`` method's cell gets the loosest rates, without asking."""
        study, use = self.studies[index], self._use(cell)
        for _ in range(self.max_redraws if use != "target" else 0):
            trial = study.ask()
            rates, allocation = self._suggest_budget(trial, use)
            violation = self.feasibility(cell.flops_target, rates) if self.feasibility else 0.0
            if violation <= 0:
                return trial, rates, allocation
            trial.set_constraint("macs", violation)
            study.tell(trial, 0.0)  # never runs: the smallest subnet it allows is over the target
        study.enqueue_trial(self._loosest(use))
        trial = study.ask()
        return trial, *self._suggest_budget(trial, use)

    def _loosest(self, use: BudgetUse) -> dict[str, float]:
        """The loosest budget's Optuna params: the highest rates, and equal shares."""
        params = {_param(s): high for s, (_, high) in enumerate(self.stage_ranges)}
        if use == "allocation":
            params.update({_alloc_param(s): 1.0 for s in range(len(self.stage_ranges))})
        return params

    def _suggest_budget(self, trial: optuna.trial.Trial, use: BudgetUse) -> tuple[list[float], list[float] | None]:
        rates = [trial.suggest_float(_param(s), low, high) for s, (low, high) in enumerate(self.stage_ranges)]
        if use != "allocation":
            return rates, None
        raw = [trial.suggest_float(_alloc_param(s), 0.0, 1.0) for s in range(len(self.stage_ranges))]
        total = sum(raw)
        return rates, [a / total for a in raw] if total > 0 else [1.0 / len(raw)] * len(raw)

    def trials_per_cell(self) -> list[int]:
        """How many trials each cell has been given so far."""
        return list(self.suggested)


def _param(stage: int) -> str:
    return f"max_prune_stage{stage}"


def _alloc_param(stage: int) -> str:
    return f"alloc_stage{stage}"


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
