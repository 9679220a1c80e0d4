"""Studies shared across FLOPs targets (issue 20, item 2), their rounds, the parent run's study
plot (item 4) and the budget bench's smoke run (item 3)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest
import torch
from ray.tune.search import Searcher

from rayprune import models
from rayprune.grid import TargetWindow
from rayprune.methods import Budget
from rayprune.methods._baseline import (
    filter_importance,
    fit_into_window,
    l1_scores,
    merge_queues,
    stage_queues,
    widths_of,
)
from rayprune.methods.random_search import sample_allocated
from rayprune.orchestration.config import Cell
from rayprune.orchestration.search import FINAL_KEY, CellSearcher, Outcome, Reachability, StudyRounds
from rayprune.tracking.mlflow_tracker import SweepTracker
from rayprune.tracking.study_plot import best_so_far

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_SPEC = models.full_spec("cifar_resnet:tiny", num_classes=10, shortcut="avgpool_conv")
QUICKSTART_RANGES = [(0.2, 0.8)] * 3
ALLOC = {"l1": "allocation", "random": "allocation", "uniform": "target"}
GOOD = [0.8, 0.1, 0.1]  # the allocation planted as good at target 0.5
State = optuna.trial.TrialState


def final(val_top1: float, flops_fraction: float) -> dict:
    return {FINAL_KEY: True, "val_top1": val_top1, "flops_fraction": flops_fraction}


def distance(allocation: list[float], to: list[float]) -> float:
    """Half the L1 distance of two shares vectors: 0 (equal) to 1 (disjoint)."""
    return sum(abs(a - b) for a, b in zip(allocation, to, strict=True)) / 2


def drive(rounds: StudyRounds, val_of, order=lambda n: range(n)) -> list[dict]:
    """Run every round, reporting the round's outcomes in ``order``; returns the configs in round order."""
    configs = []
    while not rounds.finished():
        proposals = rounds.next_round()
        batch = [rounds.config(i) for i in range(len(proposals))]
        for i in order(len(batch)):
            c = batch[i]
            rounds.report(i, Outcome("complete", val_of(c), c["flops_target"] * 0.95))
        configs += batch
    return configs


# --------------------------------------------------------------------------------------------
# Sharing across targets
# --------------------------------------------------------------------------------------------


def test_good_results_planted_at_one_target_pull_the_suggestions_at_another():
    """At 0.5, allocations near GOOD score well; at 0.7 every allocation scores alike. The 0.7
    cell's suggestions move toward GOOD, against a control study where 0.5 scores alike too."""

    def planted(c):
        return 0.5 + 0.3 * (1 - distance(c["allocation"], GOOD)) if c["flops_target"] == 0.5 else 0.5

    def mean_distance_at_07(val_of) -> float:
        distances = []
        for seed in range(3):
            rounds = StudyRounds(
                [Cell("l1", 0.5, 0.0), Cell("l1", 0.7, 0.0)],
                10,
                QUICKSTART_RANGES,
                seed=seed,
                n_startup_trials=2,
                budget_use=ALLOC,
            )
            at_07 = [c for c in drive(rounds, val_of) if c["flops_target"] == 0.7][4:]  # after the start-up
            distances += [distance(c["allocation"], GOOD) for c in at_07]
        return sum(distances) / len(distances)

    shared, control = mean_distance_at_07(planted), mean_distance_at_07(lambda c: 0.5)
    assert shared < control - 0.15, (shared, control)


def test_one_study_per_method_and_kd_weight_with_the_target_a_fixed_param():
    cells = [Cell(m, t, w) for m in ("l1", "uniform") for t in (0.5, 0.7) for w in (0.0, 0.9)]
    rounds = StudyRounds(cells, 3, QUICKSTART_RANGES, seed=0, budget_use=ALLOC)
    configs = drive(rounds, lambda c: 0.5)
    assert rounds.groups == [("l1", 0.0), ("l1", 0.9), ("uniform", 0.0), ("uniform", 0.9)]
    assert [len(s.trials) for s in rounds.studies] == [6, 6, 2, 2]  # uniform: one trial per cell
    assert rounds.trials_per_cell() == [3] * 4 + [1] * 4
    for c in configs:
        study = rounds.studies[rounds.groups.index((c["method"], c["kd_weight"]))]
        assert study.trials[c["optuna_number"]].params["flops_target"] == c["flops_target"]
    # round r gives every open cell its r-th trial, in grid order
    assert [c["cell"] for c in configs] == [0, 1, 2, 3, 4, 5, 6, 7] + [0, 1, 2, 3] * 2


def test_more_trials_per_round_run_more_at_once_in_the_same_fixed_order():
    cells = [Cell("l1", 0.5, 0.0), Cell("l1", 0.7, 0.0)]
    rounds = StudyRounds(cells, 5, QUICKSTART_RANGES, seed=0, budget_use=ALLOC, trials_per_round=2)
    sizes = []
    while not rounds.finished():
        sizes.append(len(rounds.next_round()))
        for i in range(sizes[-1]):
            rounds.report(i, Outcome("complete", 0.5, 0.45))
    assert sizes == [4, 4, 2] and rounds.trials_per_cell() == [5, 5]
    assert [h["flops_target"] for h in rounds.history][:4] == [0.5, 0.7, 0.5, 0.7]


def test_each_cell_starts_with_the_reference_budget_and_gains_are_told_against_it():
    rounds = StudyRounds([Cell("l1", 0.5, 0.0), Cell("l1", 0.7, 0.0)], 3, QUICKSTART_RANGES, seed=0, budget_use=ALLOC)
    first = rounds.next_round()
    assert [rounds.config(i)["allocation"] for i in range(2)] == [[1 / 3] * 3] * 2
    assert [rounds.config(i)["max_stage_prune"] for i in range(2)] == [[0.8] * 3] * 2
    rounds.report(0, Outcome("fail"))  # the 0.5 reference crashed
    rounds.report(1, Outcome("complete", 0.60, 0.66))
    rounds.next_round()
    rounds.report(0, Outcome("complete", 0.40, 0.48))  # the first completed trial at 0.5: its reference
    rounds.report(1, Outcome("complete", 0.65, 0.69))
    told = [(h["flops_target"], h["state"], h["objective"]) for h in rounds.history]
    assert told == [
        (0.5, "fail", None),
        (0.7, "complete", 0.0),
        (0.5, "complete", 0.0),
        (0.7, "complete", pytest.approx(0.05)),
    ]
    assert rounds.reference == {0: 0.40, 1: 0.60}
    assert first[0].trial.number == 0 and rounds.studies[0].trials[0].state == State.FAIL


def test_a_budget_that_beat_its_reference_is_tried_once_at_the_other_targets():
    rounds = StudyRounds([Cell("l1", 0.5, 0.0), Cell("l1", 0.7, 0.0)], 4, QUICKSTART_RANGES, seed=3, budget_use=ALLOC)
    configs = drive(rounds, lambda c: 0.9 if (c["flops_target"], c["optuna_number"]) == (0.5, 2) else 0.5)
    winner = next(c for c in configs if c["optuna_number"] == 2)
    copies = [c for c in configs if c["allocation"] == winner["allocation"] and c is not winner]
    assert [(c["flops_target"], c["max_stage_prune"]) for c in copies] == [(0.7, winner["max_stage_prune"])]
    assert configs.index(copies[0]) == 5  # the next round's 0.7 trial


# --------------------------------------------------------------------------------------------
# Batch-synchronous rounds: one seed, one sweep
# --------------------------------------------------------------------------------------------


def run_searcher(searcher: CellSearcher, reverse: bool) -> list[dict]:
    """Hand out each round in full, then complete its trials in order (or reversed)."""
    configs: list[dict] = []
    while True:
        batch = []
        while (config := searcher.suggest(f"t{len(configs) + len(batch)}")) not in (None, Searcher.FINISHED):
            batch.append(config)
        if not batch:
            assert config == Searcher.FINISHED
            return configs
        assert searcher.suggest("waiting") is None  # nothing more until the round is told
        ids = [f"t{len(configs) + i}" for i in range(len(batch))]
        for i in reversed(range(len(batch))) if reverse else range(len(batch)):
            c = batch[i]
            searcher.on_trial_complete(ids[i], final(0.5 + 0.2 * c["allocation"][0], c["flops_target"] * 0.9))
        configs += batch


def test_the_completion_order_does_not_change_the_suggestions():
    cells = [Cell("l1", t, 0.0) for t in (0.3, 0.5, 0.7)]
    a, b = (
        run_searcher(
            CellSearcher(cells, 5, QUICKSTART_RANGES, sampler="tpe", seed=4, n_startup_trials=2, budget_use=ALLOC),
            reverse,
        )
        for reverse in (False, True)
    )
    assert a == b and len(a) == 15
    c = run_searcher(CellSearcher(cells, 5, QUICKSTART_RANGES, sampler="tpe", seed=5, budget_use=ALLOC), False)
    assert [x["allocation"] for x in c] != [x["allocation"] for x in a]


def test_a_searcher_saved_mid_round_resumes_with_the_same_suggestions(tmp_path):
    cells = [Cell("l1", t, 0.0) for t in (0.5, 0.7)]

    def make():
        return CellSearcher(cells, 4, QUICKSTART_RANGES, sampler="tpe", seed=2, n_startup_trials=1, budget_use=ALLOC)

    whole = run_searcher(make(), False)
    interrupted = make()
    first = [interrupted.suggest(t) for t in ("a", "b")]
    interrupted.on_trial_complete("a", final(0.5 + 0.2 * first[0]["allocation"][0], 0.45))
    interrupted.save(str(tmp_path / "searcher.pkl"))  # "b" still running
    resumed = make()
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_complete("b", final(0.5 + 0.2 * first[1]["allocation"][0], 0.63))
    rest = []
    while (c := resumed.suggest(f"r{len(rest)}")) != Searcher.FINISHED:
        resumed.on_trial_complete(f"r{len(rest)}", final(0.5 + 0.2 * c["allocation"][0], c["flops_target"] * 0.9))
        rest.append(c)
    assert first + rest == whole


# --------------------------------------------------------------------------------------------
# On the quickstart model: every l1 and random subnet lands in its window, none repeats in a cell
# --------------------------------------------------------------------------------------------


def l1_subnet(budget: Budget) -> dict:
    """The widths l1 keeps under ``budget`` (seeded-init weights stand in for a trained net)."""
    spec = QUICKSTART_SPEC
    importance = filter_importance(models.build(spec, seed=0).state_dict(), models.tensor_axes(spec), l1_scores)
    target = budget.target_macs(spec, 8)
    queues = stage_queues(importance, models.channel_groups(spec), budget.min_widths(spec), budget.stage_shares(spec))
    keep, _ = fit_into_window(spec, merge_queues(queues), target, TargetWindow(target).low_macs, 8)
    return widths_of(keep)


def random_subnet(budget: Budget) -> dict:
    mins, target = budget.min_widths(QUICKSTART_SPEC), budget.target_macs(QUICKSTART_SPEC, 8)
    return sample_allocated(
        QUICKSTART_SPEC, mins, budget.stage_shares(QUICKSTART_SPEC), target, torch.Generator().manual_seed(0), 8
    )[0]


def test_quickstart_l1_and_random_cells_never_repeat_a_subnet_and_all_land_in_their_window():
    cells = [Cell(m, t, w) for m in ("l1", "random") for t in (0.5, 0.7) for w in (0.0, 0.9)]  # the quickstart grid
    rounds = StudyRounds(
        cells,
        4,
        QUICKSTART_RANGES,
        sampler="tpe",
        seed=0,
        n_startup_trials=2,
        budget_use=ALLOC,
        feasibility=Reachability(QUICKSTART_SPEC, 8),
    )
    configs = drive(rounds, lambda c: 0.5 + 0.1 * c["allocation"][0])
    full = models.macs(QUICKSTART_SPEC, 8)
    for index, cell in enumerate(cells):
        choose = l1_subnet if cell.method == "l1" else random_subnet
        hashes = set()
        for c in (c for c in configs if c["cell"] == index):
            budget = Budget(
                flops_target=cell.flops_target, max_stage_prune=c["max_stage_prune"], allocation=c["allocation"]
            )
            subnet = models.with_widths(QUICKSTART_SPEC, choose(budget))
            assert TargetWindow(cell.flops_target * full).contains(models.macs(subnet, 8)), (cell, c)
            hashes.add(models.spec_hash(subnet))
        assert len(hashes) == 4, cell  # four trials, four budgets, four subnets


# --------------------------------------------------------------------------------------------
# Item 4: the parent run's plot; item 3: the bench's smoke run
# --------------------------------------------------------------------------------------------

HISTORY = [
    {"study": "l1_kd0", "state": "complete", "objective": 0.0, "flops_target": 0.5, "flops_fraction": 0.49},
    {"study": "l1_kd0", "state": "complete", "objective": 0.03, "flops_target": 0.7, "flops_fraction": 0.75},
    {"study": "l1_kd0", "state": "fail", "objective": None, "flops_target": 0.5, "flops_fraction": None},
    {"study": "l1_kd0", "state": "complete", "objective": 0.02, "flops_target": 0.5, "flops_fraction": 0.48},
    {"study": "ast_kd0.9", "state": "pruned", "objective": None, "flops_target": 0.5, "flops_fraction": None},
    {"study": "ast_kd0.9", "state": "complete", "objective": -0.01, "flops_target": 0.5, "flops_fraction": 0.5},
]


def test_best_objective_per_study_counts_only_trials_within_their_constraint():
    # the 0.03 trial is over its target (0.75 > 0.7): not a budget found
    assert best_so_far(HISTORY) == {"l1_kd0": [0.0, 0.0, 0.0, 0.02], "ast_kd0.9": [None, -0.01]}


class FakeRuns:
    """The tracker's MLflow writer, recording what it is given (the MLflow upload itself is
    covered by the l1 sweep test in test_orchestration_sweep.py)."""

    parent = parent_run_id = "parent-run"

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.tables: dict[str, list[dict]] = {}

    def log_parent_artifact(self, local, artifact_path=None) -> None:
        self.files[f"{artifact_path}/{Path(local).name}"] = Path(local).read_bytes()

    def log_table(self, run_id, rows, artifact_file) -> None:
        assert run_id == self.parent
        self.tables[artifact_file] = rows


def test_the_parent_run_gets_the_study_plot_and_table():
    tracker = SweepTracker.__new__(SweepTracker)  # no MLflow store: only the writer's calls matter here
    tracker.runs = runs = FakeRuns()
    tracker.log_study_progress(HISTORY)
    assert set(runs.files) == {"studies/best_objective.png"}
    assert runs.files["studies/best_objective.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert runs.tables == {"studies/trials.json": HISTORY}


@pytest.mark.slow
def test_the_bench_smoke_run_takes_under_a_minute(tmp_path):
    """bench/budget_search.py --smoke, run through its main() in this process (a new interpreter
    would import torch, Optuna and SciPy again, seconds the bench does not measure)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("budget_search", ROOT / "bench" / "budget_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()  # main() computes with one thread
    start = time.perf_counter()
    try:
        assert bench.main(["--smoke", "--workdir", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    assert seconds < 60, seconds
    report = (tmp_path / "r.md").read_text()
    assert "| gp | 6 |" in report and "| random | 6 |" in report and "| uniform | 2 |" in report
    assert "l1, 6 trials: gp - random test top-1" in report
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len({(r["arm"], r["number"]) for r in rows}) == 2 + 6 + 6
