"""Which trials a sweep runs: seeded Optuna studies shared across FLOPs targets, and per-cell ASHA.

A sweep's grid has one *cell* per (method, FLOPs target, KD weight); each cell runs exactly its
quota of trials (``samples_per_cell``, or one: see below). What a trial's budget controls follows
the method's :attr:`~rayprune.methods.base.Method.budget_use`:

* ``max_rates`` (AST, TAS, SP): the per-stage maximum pruning rates (``max_prune_stage{i}``);
* ``allocation`` (l1, fpgm, random): the per-stage allocation (``alloc_stage{i}`` in [0, 1],
  normalised to shares), under the loosest maximum rates (the hard floor): with a global ranking
  the maximum rates rarely bind, so trials under different rates would mostly choose one subnet,
  and where they do bind they fold different allocations into one subnet; the allocation moves it;
* ``target`` (uniform): nothing. The FLOPs target alone fixes its subnet, so its cell runs one
  trial (not ``samples_per_cell``), with the loosest maximum rates.

**One study per (method, KD weight), shared across the FLOPs targets.** A per-cell study of 2-8
trials never leaves its sampler's random start-up, so nothing is learnt. Here the cells of one
method and KD weight share a study: the FLOPs target is a parameter of every trial
(``flops_target``), fixed by ``enqueue_trial`` and never chosen by the sampler, and the objective
is comparable across targets: the *gain* in search-val accuracy over the same method run with
the **reference budget** at the same target (the loosest maximum rates and, for ``allocation``
methods, equal shares: the uniform allocation). The reference is each cell's first trial, so it
is measured once per target, by the same trial code, and cached like any trial's training; its
own objective is 0. (If it crashes, the cell's first completed trial is the reference.)

**Warm starts.** Each cell's first trial is the reference budget (enqueued); once the study has a
budget that beat its own target's reference, each other cell gets that best-so-far budget once
(enqueued at its own target), before the sampler proposes the rest.

**Sampler.** ``random`` (the sweeps' default), ``gp`` (Optuna's ``GPSampler``: Gaussian process,
log-EI, constraint-aware) or ``tpe`` (multivariate TPE with the constant liar); the learned two
model the joint budget from a few trials, and ``n_startup_trials`` counts the random trials after
the reference ones. The choice is a measurement, ``bench/budget_search.py`` against random and
uniform budgets (verdict and tables: ``bench/results/budget_search.md``). On digits (5 seeds; 3
start-up trials, ast 2), neither learned sampler's paired difference in test top-1 against random
budgets has its 95 % interval above zero: l1 ``gp`` +0.0002 [-0.0155, +0.0158] at 32 trials,
``tpe`` +0.0082 [-0.0082, +0.0246] at 16; ast (8 trials) ``gp`` +0.0013 [-0.0448, +0.0474].
So the default is the simpler arm, ``random``. Where a sweep opts into a learned one, ``tpe`` is
the better-measured choice: higher at 16 trials (not significantly) and its suggestions cost
next to nothing, where ``gp`` refits its model for every suggestion (minutes per 32-trial study
on a loaded CPU).

**Batch-synchronous rounds, so one seed gives one sweep.** Trials of a shared study run
concurrently and finish in any order, and a study told results in another order suggests other
budgets. So suggestions come in rounds: a round asks every open cell's study for one trial
(``trials_per_round`` times), in the grid's fixed cell order, hands them out, and tells nothing
until the whole round has finished; then it tells all of them in that same order and starts the
next round (``suggest`` returns None in between: Tune waits). A round runs as many trials at once
as it has, so a sweep of few cells raises ``trials_per_round`` to fill its cluster.

**Kept from the per-cell design.** The achieved MACs are a constraint (``macs / target - 1 <=
0``, Optuna 5 ``Trial.set_constraint``). Only trials that report their final result
(``FINAL_KEY``) are COMPLETE; stopped ones are PRUNED, crashed ones FAIL. Budgets that cannot
reach the cell's target are never run: they are told to Optuna as infeasible at once and redrawn.
The whole state pickles (Tune's experiment snapshots), so a resumed sweep suggests exactly what
the uninterrupted one would have.

:class:`StudyRounds` is all of that in plain Optuna (``bench/budget_search.py`` drives it without
Ray); :class:`CellSearcher` is its Ray Tune ``Searcher``. Why not Ray's ``OptunaSearch``: it
keeps one study, never passes measured MACs to the constraint, and tells scheduler-stopped trials
to Optuna as COMPLETE with a truncated accuracy.

:class:`PerCellASHA` runs one ASHA bracket per cell, because trials of a 0.3-FLOPs cell must
not be stopped for being less accurate than those of a 0.9-FLOPs cell.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from .. import models
from ..errors import RaypruneError
from ..methods import Budget
from ..methods.base import BudgetUse
from ..models.base import Spec
from .config import Cell, cell_quota
from .trial_spec import FINAL_KEY, METRIC, TrialSpec, sample_config

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

TARGET_PARAM = "flops_target"  # every trial's fixed Optuna param: its cell's FLOPs target
Feasibility = Callable[[float, list[float]], float]  # (flops_target, rates) -> violation (<= 0: reachable)
State = optuna.trial.TrialState


class SearcherStateError(RaypruneError):
    """A resumed sweep's saved searcher state cannot be continued by this searcher."""


class _PickledState:
    """``save``/``restore`` of the whole object state, as Tune calls them on experiment snapshots."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


@dataclass
class Proposal:
    """One suggested trial: its cell, its Optuna trial and the budget drawn from it."""

    cell: int
    trial: optuna.trial.Trial
    rates: list[float]
    allocation: list[float] | None


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: ``complete`` (its final search-val accuracy and MACs fraction),
    ``pruned`` (stopped early, or ended without a final result) or ``fail`` (crashed)."""

    state: Literal["complete", "pruned", "fail"]
    val_top1: float = float("nan")
    flops_fraction: float = float("nan")

    @classmethod
    def of_result(cls, result: Mapping[str, Any] | None, error: bool = False) -> Outcome:
        """The outcome of a trial from its last Tune result."""
        if error:
            return cls("fail")
        if not result or not result.get(FINAL_KEY) or METRIC not in result:
            return cls("pruned")  # stopped early (scheduler) or no final result: its accuracy is truncated
        return cls("complete", float(result[METRIC]), float(result["flops_fraction"]))


class StudyRounds:
    """The shared studies and their batch-synchronous rounds, in plain Optuna (see the module docstring).

    Call :meth:`next_round` for the round's proposals, :meth:`report` each one's outcome (in any
    order); the round is told when its last outcome arrives. :meth:`finished` once every cell
    has had its quota.

    Args:
        cells: the grid cells, in a fixed order (it fixes the rounds and the seeds).
        samples_per_cell: trials per cell (one for a ``target`` method's cell).
        stage_ranges: per stage, the ``(low, high)`` range of the maximum pruning rate.
        sampler: ``gp``, ``tpe``, ``random`` or ``nsga2``.
        seed: the sweep's seed; study ``g``'s sampler is seeded from ``(seed, g)``.
        n_startup_trials: random trials per study, after its reference trials, before GP/TPE model.
        feasibility: ``(flops_target, rates) -> violation``; a budget with violation > 0 cannot
            reach the target and is redrawn (see :class:`Reachability`). None: every budget runs.
        max_redraws: draws per suggestion before falling back to the reference budget.
        budget_use: per method, what its study chooses (:attr:`.Method.budget_use`); a method
            not named gets ``max_rates``.
        trials_per_round: trials each open cell gets per round: more run at once, fewer rounds
            to learn from (a sweep of few cells needs more than one to fill its cluster).
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
        trials_per_round: int = 1,
    ) -> None:
        if samples_per_cell < 1 or trials_per_round < 1:
            raise ValueError(f"samples_per_cell, trials_per_round must be >= 1: {samples_per_cell}, {trials_per_round}")
        self.trials_per_round = trials_per_round
        self.cells = list(cells)
        self.samples_per_cell = samples_per_cell
        self.stage_ranges = [(float(low), float(high)) for low, high in stage_ranges]
        self.feasibility = feasibility
        self.max_redraws = max_redraws
        self.budget_use: dict[str, BudgetUse] = dict(budget_use or {})
        self.groups = list(dict.fromkeys((c.method, c.kd_weight) for c in self.cells))  # one study each
        self.group_of = [self.groups.index((c.method, c.kd_weight)) for c in self.cells]
        self.studies = [
            _make_study(sampler, _cell_seed(seed, g), n_startup_trials + self.group_of.count(g))
            for g in range(len(self.groups))
        ]
        self.suggested = [0] * len(self.cells)
        self.round: list[Proposal] = []
        self.outcomes: dict[int, Outcome] = {}  # position in the round -> outcome
        self.reference: dict[int, float] = {}  # cell -> its reference trial's search-val accuracy
        self.warm_started: set[int] = set()  # cells that got the study's best-so-far budget
        self.history: list[dict[str, Any]] = []  # every trial told, in order (the study plot's data)

    # -- rounds --------------------------------------------------------------------------------
    def quota(self, index: int) -> int:
        """Trials cell ``index`` runs."""
        return cell_quota(self._use(self.cells[index]), self.samples_per_cell)

    def open_cells(self) -> list[int]:
        """The cells below their quota, in grid order."""
        return [i for i in range(len(self.cells)) if self.suggested[i] < self.quota(i)]

    def finished(self) -> bool:
        """Every cell has had its quota and the last round was told."""
        return not self.round and not self.open_cells()

    def next_round(self) -> list[Proposal]:
        """Ask ``trials_per_round`` trials of every open cell, one per cell at a time in grid order
        (the previous round must be told)."""
        if self.round:
            raise RuntimeError("the current round has not been told yet")
        self.round = []
        for _ in range(self.trials_per_round):
            self.round += [self._propose(i) for i in self.open_cells()]
        self.outcomes = {}
        return list(self.round)

    def config(self, position: int) -> dict[str, Any]:
        """The Tune config part (:func:`.sample_config`) of the round's ``position``-th proposal."""
        p = self.round[position]
        return sample_config(p.cell, self.cells[p.cell].key, p.rates, p.trial.number, p.allocation)

    def report(self, position: int, outcome: Outcome) -> bool:
        """Record a proposal's outcome; True when that completed the round, which is then told."""
        if position in self.outcomes or not 0 <= position < len(self.round):
            return False  # told once only
        self.outcomes[position] = outcome
        if len(self.outcomes) < len(self.round):
            return False
        for i, proposal in enumerate(self.round):
            self._tell(proposal, self.outcomes[i])
        self.round, self.outcomes = [], {}
        return True

    def trials_per_cell(self) -> list[int]:
        """How many trials each cell has been given so far."""
        return list(self.suggested)

    # -- internals -------------------------------------------------------------------------------
    def _use(self, cell: Cell) -> BudgetUse:
        return self.budget_use.get(cell.method, "max_rates")

    def _propose(self, index: int) -> Proposal:
        cell = self.cells[index]
        use, fixed = self._use(cell), {TARGET_PARAM: cell.flops_target}
        first = self.suggested[index] == 0
        self.suggested[index] += 1
        if first or use == "target":  # the config check proved the reference budget reachable
            return self._ask(index, {**self._reference(use), **fixed})
        warm = self._best_elsewhere(index)
        if warm is not None:
            proposal = self._ask(index, {**warm, **fixed})
            if self._violation(index, proposal.rates) <= 0:
                return proposal
            self._tell_unreachable(index, proposal)
        for _ in range(self.max_redraws):
            proposal = self._ask(index, fixed)  # the target is fixed; the sampler proposes the rest
            if self._violation(index, proposal.rates) <= 0:
                return proposal
            self._tell_unreachable(index, proposal)
        return self._ask(index, {**self._reference(use), **fixed})

    def _ask(self, index: int, params: dict[str, float]) -> Proposal:
        study = self.studies[self.group_of[index]]
        study.enqueue_trial(params)
        trial = study.ask()
        group = self.group_of[index]
        targets = [c.flops_target for c, g in zip(self.cells, self.group_of, strict=True) if g == group]
        trial.suggest_float(TARGET_PARAM, min(targets), max(targets))
        rates, allocation = self._suggest_budget(trial, self._use(self.cells[index]))
        return Proposal(index, trial, rates, allocation)

    def _violation(self, index: int, rates: list[float]) -> float:
        return self.feasibility(self.cells[index].flops_target, rates) if self.feasibility else 0.0

    def _tell_unreachable(self, index: int, proposal: Proposal) -> None:
        """Never runs: the smallest subnet its budget allows is over the target."""
        proposal.trial.set_constraint("macs", self._violation(index, proposal.rates))
        self.studies[self.group_of[index]].tell(proposal.trial, 0.0)

    def _best_elsewhere(self, index: int) -> dict[str, float] | None:
        """The study's best budget so far (a feasible gain > 0, not yet tried at this cell's target), once per cell."""
        if index in self.warm_started:
            return None
        target = self.cells[index].flops_target
        study = self.studies[self.group_of[index]]
        trials = study.get_trials(deepcopy=False)
        tried_here = {_budget_of(t.params) for t in trials if t.params.get(TARGET_PARAM) == target}
        gains = [
            t
            for t in trials
            if t.state == State.COMPLETE
            and t.value is not None
            and t.value > 0
            and all(v <= 0 for v in t.constraints.values())
            and _budget_of(t.params) not in tried_here  # e.g. a budget this cell's own best lent elsewhere
        ]
        if not gains:
            return None
        self.warm_started.add(index)
        best = max(gains, key=lambda t: (t.value, -t.number))
        return dict(_budget_of(best.params))

    def _tell(self, proposal: Proposal, outcome: Outcome) -> None:
        index, trial = proposal.cell, proposal.trial
        cell, study = self.cells[index], self.studies[self.group_of[index]]
        objective = None
        if outcome.state == "fail":
            study.tell(trial, state=State.FAIL)
        elif outcome.state == "pruned":
            study.tell(trial, state=State.PRUNED)
        else:
            objective = outcome.val_top1 - self.reference.setdefault(index, outcome.val_top1)
            trial.set_user_attr(METRIC, outcome.val_top1)
            trial.set_constraint("macs", _violation(outcome.flops_fraction, cell.flops_target))
            study.tell(trial, objective)
        self.history.append(
            {
                "study": _study_name(cell),
                "method": cell.method,
                "kd_weight": cell.kd_weight,
                "flops_target": cell.flops_target,
                "number": trial.number,
                "state": outcome.state,
                METRIC: None if objective is None else outcome.val_top1,
                "flops_fraction": None if objective is None else outcome.flops_fraction,
                "objective": objective,
            }
        )

    def _reference(self, use: BudgetUse) -> dict[str, float]:
        return reference_budget(use, self.stage_ranges)

    def _suggest_budget(self, trial: optuna.trial.Trial, use: BudgetUse) -> tuple[list[float], list[float] | None]:
        return suggest_budget(trial, use, self.stage_ranges)


class Rounds(Protocol):
    """What :class:`CellSearcher` drives: :class:`StudyRounds`, or the front mode's
    :class:`~.front_mode.FrontRounds`."""

    history: list[dict[str, Any]]
    studies: list[optuna.Study]

    def finished(self) -> bool: ...
    def next_round(self) -> list[Proposal]: ...
    def config(self, position: int) -> dict[str, Any]: ...
    def report(self, position: int, outcome: Outcome) -> bool: ...
    def trials_per_cell(self) -> list[int]: ...


class CellSearcher(_PickledState, Searcher):
    """:class:`StudyRounds` as a Ray Tune ``Searcher`` (same arguments; see the module docstring).

    ``suggest`` hands out the current round's proposals, returns None while the round runs
    (Tune waits) and FINISHED after the last one. ``history_path``: a JSON file rewritten after
    every round with :attr:`StudyRounds.history` (the driver plots it on the parent run).
    """

    def __init__(
        self,
        cells: Sequence[Cell],
        samples_per_cell: int,
        stage_ranges: Sequence[tuple[float, float]],
        *,
        history_path: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(metric=METRIC, mode="max")
        self.rounds: Rounds = StudyRounds(cells, samples_per_cell, stage_ranges, **options)
        self.history_path = history_path
        self.queue: list[int] = []  # positions of the current round not handed out yet
        self.pending: dict[str, int] = {}  # tune trial id -> its position in the current round

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if "rounds" not in state:
            raise SearcherStateError(
                "this sweep was started by an older rayprune (one Optuna study per grid cell) and "
                "cannot continue with shared studies; resume it with that version, or start it afresh"
            )
        self.__dict__.update(state)

    # -- Searcher API ----------------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the metric is fixed (METRIC, max); the space is ours

    def suggest(  # type: ignore[override]  # Ray's hint omits the str Searcher.FINISHED it documents
        self, trial_id: str
    ) -> dict[str, Any] | str | None:
        if not self.queue and not self.pending:
            if self.rounds.finished():
                return Searcher.FINISHED
            self.queue = list(range(len(self.rounds.next_round())))
        if not self.queue:
            return None  # the round is still running: nothing is told before all of it finished
        position = self.queue.pop(0)
        self.pending[trial_id] = position
        return self.rounds.config(position)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        position = self.pending.pop(trial_id, None)
        if position is None:  # not ours, or already told (e.g. an errored trial restarted on resume)
            return
        if self.rounds.report(position, Outcome.of_result(result, error)) and self.history_path:
            write_history(self.rounds.history, self.history_path)

    @property
    def studies(self) -> list[optuna.Study]:
        """The shared studies, one per (method, KD weight) in grid order."""
        return self.rounds.studies

    def trials_per_cell(self) -> list[int]:
        """How many trials each cell has been given so far."""
        return self.rounds.trials_per_cell()


def reference_budget(use: BudgetUse, stage_ranges: Sequence[tuple[float, float]]) -> dict[str, float]:
    """The reference budget's Optuna params: the highest rates, or (allocation) equal shares."""
    if use == "allocation":
        return {_alloc_param(s): 1.0 for s in range(len(stage_ranges))}
    return {_param(s): high for s, (_, high) in enumerate(stage_ranges)}


def suggest_budget(
    trial: optuna.trial.Trial, use: BudgetUse, stage_ranges: Sequence[tuple[float, float]]
) -> tuple[list[float], list[float] | None]:
    """A trial's budget as ``(maximum rates, allocation or None)``, suggested as ``use`` says."""
    loosest = [high for _, high in stage_ranges]
    if use == "target":
        return loosest, None
    if use == "max_rates":
        return [trial.suggest_float(_param(s), low, high) for s, (low, high) in enumerate(stage_ranges)], None
    # The allocation alone: sampled maximum rates that bind would only fold different
    # allocations into one subnet (and double the space the sampler must model).
    raw = [trial.suggest_float(_alloc_param(s), 0.0, 1.0) for s in range(len(stage_ranges))]
    total = sum(raw)
    return loosest, [a / total for a in raw] if total > 0 else [1.0 / len(raw)] * len(raw)


def write_history(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write the told trials as JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


def _budget_of(params: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """A trial's budget: its Optuna params without the FLOPs target, hashable."""
    return tuple(sorted((k, float(v)) for k, v in params.items() if k != TARGET_PARAM))


def _study_name(cell: Cell) -> str:
    return f"{cell.method}_kd{cell.kd_weight:g}"


def _param(stage: int) -> str:
    return f"max_prune_stage{stage}"


def _alloc_param(stage: int) -> str:
    return f"alloc_stage{stage}"


def _violation(flops_fraction: float, flops_target: float) -> float:
    return float(flops_fraction) / flops_target - 1.0


def _cell_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919) % (2**31 - 1)


def _make_study(sampler: str, seed: int, n_startup_trials: int) -> optuna.Study:
    samplers: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=n_startup_trials, multivariate=True, constant_liar=True
        ),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, n_startup_trials)),
    }
    if sampler not in samplers:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(samplers)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # multivariate TPE and its constant liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
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
