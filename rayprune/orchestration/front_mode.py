"""The front mode (``grid: {flops_targets: auto}``): search the accuracy/MACs front directly.

Instead of fixed FLOPs targets, each (method, KD weight) gets one seeded **multi-objective**
Optuna study over (search-val top-1: maximise, MACs fraction: minimise). A trial's FLOPs target
is a suggested parameter in ``grid.target_range`` (rounded to 3 decimals), and the budget beside
it is what the grid mode's studies choose (:attr:`~rayprune.methods.base.Method.budget_use`:
maximum rates, or the allocation under the loosest rates; a ``target`` method's budget is its
target alone, so its study only moves the target). Each study runs ``optuna.samples_per_cell``
trials; its first ``min(n_startup_trials, samples_per_cell)`` are enqueued at targets evenly
spread over the range with the reference budget, so that every study starts with the whole MACs
axis covered whatever the sampler (``random`` samples it too, but a few trials can cluster).

Everything else is the grid mode's: batch-synchronous rounds (one seed gives one sweep, and a
resumed sweep suggests what the uninterrupted one would), unreachable budgets redrawn, stopped
trials told as PRUNED, crashed ones as FAIL. A trial's ``cell`` index is its study's, so ASHA
(:class:`~.search.PerCellASHA`) runs one bracket per (method, KD weight); its cell *key* carries
its own target (``l1_f0.437_kd0``), which names its trial, cache folder and fine-tune run.

At the end, :func:`choose_front_points` takes each study's Pareto set over the trials' final
(search-val top-1, MACs) and thins it to ``grid.front_points`` points spread evenly over the MACs
axis; the driver fine-tunes them like grid cells' chosen subnets (same recipe, same cache), and
their records say ``source["search_mode"] = "front"`` (an MLflow param of their runs too).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna

from ..grid import CellKey
from ..methods.base import BudgetUse
from .cell_finetune import CellChoice, final_choices
from .search import (
    METRIC,
    TARGET_PARAM,
    CellSearcher,
    Feasibility,
    Outcome,
    Proposal,
    State,
    _cell_seed,
    reference_budget,
    suggest_budget,
)
from .trial_spec import sample_config

if TYPE_CHECKING:
    from ray.tune import ResultGrid

__all__ = [
    "FRONT_MODE",
    "FrontRounds",
    "FrontSearcher",
    "choose_front_points",
    "hypervolume",
    "pareto_indices",
    "spread_targets",
    "thin_evenly",
]

FRONT_MODE = "front"  # source["search_mode"] of a point the front mode chose
TARGET_DECIMALS = 3  # a suggested target is rounded: it names the trial's cell, folders and runs
INFEASIBLE = (0.0, 1.0)  # the values told for a budget that never ran: no accuracy at full MACs


def spread_targets(target_range: tuple[float, float], n: int) -> list[float]:
    """``n`` targets evenly over ``target_range``, both ends included (one: the upper end)."""
    low, high = target_range
    if n <= 1:
        return [round(high, TARGET_DECIMALS)]
    return [round(low + (high - low) * i / (n - 1), TARGET_DECIMALS) for i in range(n)]


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """The indices of the non-dominated ``(accuracy, macs)`` points (accuracy up, MACs down),
    sorted by MACs; of equal points only the first counts."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    front: list[int] = []
    for i in order:
        if not front or points[i][0] > points[front[-1]][0]:
            front.append(i)
    return front


def thin_evenly(macs: Sequence[float], n: int) -> list[int]:
    """At most ``n`` indices of ``macs`` (sorted ascending) whose values spread evenly from the
    least to the most: for each of ``n`` evenly spaced marks, the nearest point not taken yet."""
    if len(macs) <= n:
        return list(range(len(macs)))
    low, high = macs[0], macs[-1]
    marks = [low] if n == 1 else [low + (high - low) * j / (n - 1) for j in range(n)]
    taken: list[int] = []
    for mark in marks:
        free = [i for i in range(len(macs)) if i not in taken]
        taken.append(min(free, key=lambda i: (abs(macs[i] - mark), i)))
    return sorted(taken)


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area that ``(accuracy, macs)`` points dominate (accuracy up, MACs down) and that
    dominates ``reference``; points not better than it in both coordinates add nothing."""
    ref_acc, ref_macs = reference
    useful = [points[i] for i in pareto_indices(points) if points[i][0] > ref_acc and points[i][1] < ref_macs]
    area = 0.0
    for k, (acc, macs) in enumerate(useful):  # sorted by MACs, accuracy rising
        next_macs = useful[k + 1][1] if k + 1 < len(useful) else ref_macs
        area += (next_macs - macs) * (acc - ref_acc)
    return area


class FrontRounds:
    """The front mode's studies and their batch-synchronous rounds (see the module docstring),
    with the interface of :class:`~.search.StudyRounds` that :class:`~.search.CellSearcher` drives.

    Args:
        groups: the (method, KD weight) pairs, one study each, in a fixed order.
        trials_per_study: trials each study runs.
        stage_ranges: per stage, the ``(low, high)`` range of the maximum pruning rate.
        target_range: the ``(low, high)`` range of the suggested FLOPs target.
        sampler: ``random``, ``tpe``, ``gp`` or ``nsga2`` (each in its multi-objective form).
        seed: the sweep's seed; study ``g``'s sampler is seeded from ``(seed, g)``.
        n_startup_trials: the trials per study enqueued at evenly spread targets.
        feasibility: ``(flops_target, rates) -> violation``; violation > 0 is redrawn.
        max_redraws: draws per suggestion before falling back to the reference budget.
        budget_use: per method, what its study chooses beside the target.
        trials_per_round: trials each open study gets per round.
    """

    def __init__(
        self,
        groups: Sequence[tuple[str, float]],
        trials_per_study: int,
        stage_ranges: Sequence[tuple[float, float]],
        target_range: tuple[float, float],
        *,
        sampler: str = "random",
        seed: int = 0,
        n_startup_trials: int = 4,
        feasibility: Feasibility | None = None,
        max_redraws: int = 20,
        budget_use: Mapping[str, BudgetUse] | None = None,
        trials_per_round: int = 1,
    ) -> None:
        if trials_per_study < 1 or trials_per_round < 1:
            raise ValueError(f"trials_per_study, trials_per_round must be >= 1: {trials_per_study}, {trials_per_round}")
        self.groups = [(str(m), float(w)) for m, w in groups]
        self.trials_per_study = trials_per_study
        self.stage_ranges = [(float(lo), float(hi)) for lo, hi in stage_ranges]
        self.target_range = (float(target_range[0]), float(target_range[1]))
        self.feasibility = feasibility
        self.max_redraws = max_redraws
        self.budget_use: dict[str, BudgetUse] = dict(budget_use or {})
        self.trials_per_round = trials_per_round
        self.spread = spread_targets(self.target_range, min(n_startup_trials, trials_per_study))
        self.studies = [
            _make_front_study(sampler, _cell_seed(seed, g), n_startup_trials) for g in range(len(self.groups))
        ]
        self.suggested = [0] * len(self.groups)
        self.round: list[Proposal] = []
        self.targets: list[float] = []  # the round's proposals' (rounded) targets
        self.outcomes: dict[int, Outcome] = {}
        self.history: list[dict[str, Any]] = []

    # -- rounds (StudyRounds' interface) -----------------------------------------------------------
    def open_cells(self) -> list[int]:
        """The studies below their quota, in order."""
        return [g for g in range(len(self.groups)) if self.suggested[g] < self.trials_per_study]

    def finished(self) -> bool:
        """Every study has had its trials and the last round was told."""
        return not self.round and not self.open_cells()

    def next_round(self) -> list[Proposal]:
        """Ask ``trials_per_round`` trials of every open study, one per study at a time."""
        if self.round:
            raise RuntimeError("the current round has not been told yet")
        self.targets = []
        for _ in range(self.trials_per_round):
            for g in self.open_cells():
                proposal, target = self._propose(g)
                self.round.append(proposal)
                self.targets.append(target)
        self.outcomes = {}
        return list(self.round)

    def config(self, position: int) -> dict[str, Any]:
        """The Tune config part of the round's ``position``-th proposal: its study's index is
        the trial's cell index (one ASHA bracket per study), its own target in its cell key."""
        p, target = self.round[position], self.targets[position]
        method, kd = self.groups[p.cell]
        return sample_config(p.cell, CellKey(method, target, kd), p.rates, p.trial.number, p.allocation)

    def report(self, position: int, outcome: Outcome) -> bool:
        """Record a proposal's outcome; True when that completed the round, which is then told."""
        if position in self.outcomes or not 0 <= position < len(self.round):
            return False
        self.outcomes[position] = outcome
        if len(self.outcomes) < len(self.round):
            return False
        for i, proposal in enumerate(self.round):
            self._tell(proposal, self.targets[i], self.outcomes[i])
        self.round, self.targets, self.outcomes = [], [], {}
        return True

    def trials_per_cell(self) -> list[int]:
        """How many trials each study has been given so far."""
        return list(self.suggested)

    # -- internals -------------------------------------------------------------------------------
    def _use(self, group: int) -> BudgetUse:
        return self.budget_use.get(self.groups[group][0], "max_rates")

    def _propose(self, group: int) -> tuple[Proposal, float]:
        number = self.suggested[group]
        self.suggested[group] += 1
        use = self._use(group)
        # A method steered by the target alone suggests no budget params: nothing to fix.
        reference = {} if use == "target" else reference_budget(use, self.stage_ranges)
        if number < len(self.spread):  # the config check proved the reference reachable in the range
            return self._ask(group, {TARGET_PARAM: self.spread[number], **reference})
        target = self.target_range[1]
        for _ in range(self.max_redraws):
            proposal, target = self._ask(group, {})
            violation = self._violation(target, proposal.rates)
            if violation <= 0:
                return proposal, target
            proposal.trial.set_constraint("macs", violation)
            self.studies[group].tell(proposal.trial, list(INFEASIBLE))
        return self._ask(group, {TARGET_PARAM: target, **reference})

    def _ask(self, group: int, fixed: dict[str, float]) -> tuple[Proposal, float]:
        study = self.studies[group]
        if fixed:
            study.enqueue_trial(fixed)
        trial = study.ask()
        target = round(trial.suggest_float(TARGET_PARAM, *self.target_range), TARGET_DECIMALS)
        rates, allocation = suggest_budget(trial, self._use(group), self.stage_ranges)
        return Proposal(group, trial, rates, allocation), target

    def _violation(self, target: float, rates: list[float]) -> float:
        return self.feasibility(target, rates) if self.feasibility else 0.0

    def _tell(self, proposal: Proposal, target: float, outcome: Outcome) -> None:
        study = self.studies[proposal.cell]
        if outcome.state == "fail":
            study.tell(proposal.trial, state=State.FAIL)
        elif outcome.state == "pruned":
            study.tell(proposal.trial, state=State.PRUNED)
        else:
            proposal.trial.set_user_attr(METRIC, outcome.val_top1)
            proposal.trial.set_constraint("macs", 0.0)  # any MACs is a point of the front
            study.tell(proposal.trial, [outcome.val_top1, outcome.flops_fraction])
        method, kd = self.groups[proposal.cell]
        done = outcome.state == "complete"
        self.history.append(
            {
                "study": f"{method}_kd{kd:g}",
                "method": method,
                "kd_weight": kd,
                "flops_target": target,
                "number": proposal.trial.number,
                "state": outcome.state,
                METRIC: outcome.val_top1 if done else None,
                "flops_fraction": outcome.flops_fraction if done else None,
                # the study's progress: the area its front dominates over (0 top-1, full MACs)
                "objective": self._study_hypervolume(proposal.cell) if done else None,
            }
        )

    def _study_hypervolume(self, group: int) -> float:
        trials = self.studies[group].get_trials(deepcopy=False, states=(State.COMPLETE,))
        feasible = [t for t in trials if all(v <= 0 for v in t.constraints.values()) and t.values]
        return hypervolume([(t.values[0], t.values[1]) for t in feasible], (0.0, 1.0))


def _make_front_study(sampler: str, seed: int, n_startup_trials: int) -> optuna.Study:
    samplers: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, n_startup_trials)),
    }
    if sampler not in samplers:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(samplers)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # multivariate TPE is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.create_study(directions=["maximize", "minimize"], sampler=samplers[sampler]())


class FrontSearcher(CellSearcher):
    """:class:`FrontRounds` as a Ray Tune ``Searcher`` (same arguments, and ``history_path`` as
    for :class:`~.search.CellSearcher`, whose suggest/complete/save/restore it keeps)."""

    def __init__(
        self,
        groups: Sequence[tuple[str, float]],
        trials_per_study: int,
        stage_ranges: Sequence[tuple[float, float]],
        target_range: tuple[float, float],
        *,
        history_path: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__([], 1, stage_ranges, history_path=history_path)
        self.rounds = FrontRounds(groups, trials_per_study, stage_ranges, target_range, **options)


def choose_front_points(results: ResultGrid, front_points: int) -> list[CellChoice]:
    """Per study (trial cell index), the Pareto set of the finished trials' final (search-val
    top-1, MACs), thinned to ``front_points`` spread evenly over MACs; marked as the front mode's.
    Points whose cell names coincide (the same rounded target) keep the first."""
    by_study: dict[int, list[CellChoice]] = {}
    for choice in final_choices(results):
        by_study.setdefault(choice.spec.cell_index, []).append(choice)
    chosen: list[CellChoice] = []
    for study in sorted(by_study):
        trials = sorted(by_study[study], key=lambda c: c.spec.optuna_number)
        points = [(_val(c), float(c.record["macs"])) for c in trials]
        front = pareto_indices(points)
        names: set[str] = set()
        for k in thin_evenly([points[i][1] for i in front], front_points):
            choice = trials[front[k]]
            if choice.cell not in names:
                names.add(choice.cell)
                chosen.append(CellChoice(choice.spec, choice.result, choice.record, origin=FRONT_MODE))
    return chosen


def _val(choice: CellChoice) -> float:
    val = choice.record["metrics"].get(METRIC)
    return float("-inf") if val is None or val != val else float(val)
