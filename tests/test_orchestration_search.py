"""The shared-study Optuna searcher and the per-cell ASHA scheduler, driven by hand (no Ray cluster).

More on the shared studies (sharing, rounds, the objective): tests/test_shared_studies.py."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from rayprune import models
from rayprune.orchestration.config import Cell
from rayprune.orchestration.search import FINAL_KEY, CellSearcher, PerCellASHA, Reachability, SearcherStateError
from rayprune.orchestration.trial_spec import sample_config, shared_config

CELLS = [Cell("uniform", 0.5, 0.0), Cell("uniform", 0.5, 0.9), Cell("l1", 0.7, 0.0)]
RANGES = [(0.1, 0.8), (0.2, 0.6), (0.0, 0.5)]
State = optuna.trial.TrialState


def final(val_top1: float, flops_fraction: float) -> dict:
    return {FINAL_KEY: True, "val_top1": val_top1, "flops_fraction": flops_fraction}


def run_all(searcher: CellSearcher, score=lambda c: 0.5 + 0.1 * c["max_stage_prune"][0]) -> list[dict]:
    """Suggest until FINISHED, completing every trial at once; returns the suggestions."""
    out = []
    while (config := searcher.suggest(f"t{len(out)}")) != Searcher.FINISHED:
        out.append(config)
        searcher.on_trial_complete(f"t{len(out) - 1}", final(score(config), config["flops_target"] * 0.95))
    return out


def test_every_cell_gets_exactly_its_trials_round_robin():
    searcher = CellSearcher(CELLS, 3, RANGES, seed=0)
    configs = run_all(searcher)
    assert [c["cell"] for c in configs] == [0, 1, 2] * 3
    assert searcher.trials_per_cell() == [3, 3, 3]
    assert searcher.suggest("extra") == Searcher.FINISHED
    for c in configs:
        cell = CELLS[c["cell"]]
        assert (c["method"], c["flops_target"], c["kd_weight"]) == tuple(cell)
        assert all(low <= r <= high for r, (low, high) in zip(c["max_stage_prune"], RANGES, strict=True))
    assert [len(s.trials) for s in searcher.studies] == [3, 3, 3]  # one study per (method, KD weight): one cell each


def test_same_seed_same_budgets_other_seed_others():
    a, b, c = (run_all(CellSearcher(CELLS, 6, RANGES, seed=s, n_startup_trials=2)) for s in (7, 7, 8))
    assert a == b
    assert [x["max_stage_prune"] for x in a] != [x["max_stage_prune"] for x in c]
    # Every cell starts with the reference budget (the loosest rates); then the studies, seeded
    # differently, draw differently although every study starts alike.
    firsts = [next(x for x in a if x["cell"] == i)["max_stage_prune"] for i in range(3)]
    assert firsts == [[0.8, 0.6, 0.5]] * 3
    seconds = [[x for x in a if x["cell"] == i][1]["max_stage_prune"] for i in range(3)]
    assert len({tuple(f) for f in seconds}) == 3


def test_the_gain_over_the_reference_is_the_value_and_macs_over_target_a_violated_constraint():
    searcher = CellSearcher(CELLS[:1], 2, RANGES, seed=0)
    first = searcher.suggest("a")
    assert searcher.suggest("b") is None  # round 0 (the reference) runs: nothing else before it is told
    searcher.on_trial_complete("a", final(0.8, 0.45))  # 0.45 / 0.5 - 1 = -0.1: feasible
    second = searcher.suggest("b")
    searcher.on_trial_complete("b", final(0.9, 0.60))  # 0.60 / 0.5 - 1 = +0.2: infeasible
    trials = searcher.studies[0].trials
    assert [t.state for t in trials] == [State.COMPLETE, State.COMPLETE]
    assert [t.value for t in trials] == [0.0, pytest.approx(0.1)]  # gains over the reference's 0.8
    assert [t.user_attrs["val_top1"] for t in trials] == [0.8, 0.9]
    assert trials[0].constraints["macs"] == pytest.approx(-0.1)
    assert trials[1].constraints["macs"] == pytest.approx(0.2)
    assert [trials[i].params for i in range(2)] == [
        {"flops_target": 0.5, **{f"max_prune_stage{s}": r for s, r in enumerate(c["max_stage_prune"])}}
        for c in (first, second)
    ]
    assert [t.number for t in searcher.studies[0].best_trials] == [0]  # the more accurate one is infeasible


def test_early_stopped_trials_are_pruned_and_crashed_ones_failed():
    cells = [Cell("l1", t, 0.0) for t in (0.3, 0.4, 0.5, 0.6)]  # one study, one round of four
    searcher = CellSearcher(cells, 1, RANGES, seed=0)
    for t in "abcd":
        searcher.suggest(t)
    searcher.on_trial_complete("a", {FINAL_KEY: False, "val_top1": 0.3, "flops_fraction": 0.4})  # ASHA stopped it
    searcher.on_trial_complete("b", None)
    searcher.on_trial_complete("c", None, error=True)
    assert [t.state for t in searcher.studies[0].trials] == [State.RUNNING] * 4  # told when the round is done
    searcher.on_trial_complete("d", final(0.7, 0.5))
    searcher.on_trial_complete("d", final(0.1, 0.5))  # told once only
    states = [t.state for t in searcher.studies[0].trials]
    assert states == [State.PRUNED, State.PRUNED, State.FAIL, State.COMPLETE]
    assert searcher.studies[0].trials[3].value == 0.0 and searcher.studies[0].trials[3].user_attrs["val_top1"] == 0.7


def test_unreachable_budgets_are_told_infeasible_and_never_run():
    spec = models.full_spec("cifar_resnet:tiny", shortcut="avgpool_conv")
    reach = Reachability(spec, 16)
    assert reach(0.3, [0.05, 0.05, 0.05]) > 0 and reach(0.3, [0.9, 0.9, 0.9]) <= 0
    searcher = CellSearcher([Cell("uniform", 0.3, 0.0)], 3, [(0.0, 0.9)] * 3, seed=0, feasibility=reach)
    configs = run_all(searcher)
    assert len(configs) == 3
    assert all(reach(0.3, c["max_stage_prune"]) <= 0 for c in configs)
    trials = searcher.studies[0].trials
    told_infeasible = [t for t in trials if t.number not in {c["optuna_number"] for c in configs}]
    assert told_infeasible and all(t.constraints["macs"] > 0 and t.value == 0.0 for t in told_infeasible)


def test_falls_back_to_the_loosest_budget_when_redraws_run_out():
    def always_bad(target, rates):
        return 0.0 if rates == [0.8, 0.6, 0.5] else 1.0

    searcher = CellSearcher(CELLS[:1], 2, RANGES, seed=0, feasibility=always_bad, max_redraws=3)
    searcher.suggest("a")  # the reference budget: reachable by the config's check, never redrawn
    searcher.on_trial_complete("a", final(0.5, 0.5))
    config = searcher.suggest("b")
    assert config["max_stage_prune"] == [0.8, 0.6, 0.5]
    assert len(searcher.studies[0].trials) == 1 + 3 + 1


def test_save_and_restore_continue_exactly(tmp_path):
    def partial(searcher):
        for i in range(4):
            c = searcher.suggest(f"t{i}")
            if i < 3:
                searcher.on_trial_complete(f"t{i}", final(0.5 + 0.01 * i, c["flops_target"]))
        return c

    a = CellSearcher(CELLS, 3, RANGES, seed=1, n_startup_trials=1)
    partial(a)
    a.save(str(tmp_path / "s.pkl"))
    b = CellSearcher(CELLS, 3, RANGES, seed=99)  # everything comes from the saved state
    b.restore(str(tmp_path / "s.pkl"))
    for s in (a, b):
        s.on_trial_complete("t3", final(0.6, 0.3))  # the trial pending at save time is still known
    assert run_all(a) == run_all(b)
    assert b.trials_per_cell() == [3, 3, 3]


USES = {"uniform": "target", "l1": "allocation"}


def test_allocation_methods_get_shares_and_target_methods_one_trial_at_the_loosest_rates():
    searcher = CellSearcher(CELLS, 3, RANGES, seed=0, budget_use=USES)
    configs = run_all(searcher)
    assert [c["cell"] for c in configs] == [0, 1, 2, 2, 2]  # the uniform cells run once
    assert searcher.trials_per_cell() == [1, 1, 3]
    for c in configs[:2]:
        assert c["max_stage_prune"] == [0.8, 0.6, 0.5] and "allocation" not in c
    study = searcher.studies[2]
    for c, trial in zip(configs[2:], study.trials, strict=True):
        raw = [trial.params[f"alloc_stage{s}"] for s in range(3)]
        assert c["allocation"] == [a / sum(raw) for a in raw] and sum(c["allocation"]) == pytest.approx(1.0)
        assert c["max_stage_prune"] == [0.8, 0.6, 0.5]  # the loosest: the allocation alone is chosen
        assert not any(k.startswith("max_prune_stage") for k in trial.params)
    assert len({tuple(c["allocation"]) for c in configs[2:]}) == 3


def test_allocations_are_seeded_and_restored_exactly(tmp_path):
    a, b = (run_all(CellSearcher(CELLS, 4, RANGES, seed=5, n_startup_trials=2, budget_use=USES)) for _ in "ab")
    assert a == b
    first = CellSearcher(CELLS, 4, RANGES, seed=5, n_startup_trials=2, budget_use=USES)
    for i in range(3):
        c = first.suggest(f"t{i}")
        first.on_trial_complete(f"t{i}", final(0.5 + 0.01 * i, c["flops_target"]))
    first.save(str(tmp_path / "s.pkl"))
    second = CellSearcher(CELLS, 4, RANGES, seed=99)  # the budget uses come from the saved state too
    second.restore(str(tmp_path / "s.pkl"))
    assert run_all(first) == run_all(second)


def test_a_searcher_saved_with_per_cell_studies_is_refused_in_one_line(tmp_path):
    old = {"cells": CELLS, "studies": [], "suggested": [0, 0, 0], "pending": {}}  # what rayprune 0.2 pickled
    (tmp_path / "s.pkl").write_bytes(pickle.dumps(old))
    with pytest.raises(SearcherStateError, match=r"started by an older rayprune .* resume it with that version"):
        CellSearcher(CELLS, 2, RANGES, seed=0).restore(str(tmp_path / "s.pkl"))


def test_a_failed_redraw_falls_back_to_the_loosest_rates_and_equal_shares():
    searcher = CellSearcher(CELLS[2:], 2, RANGES, seed=0, feasibility=lambda *_: 1.0, max_redraws=2, budget_use=USES)
    searcher.suggest("a")  # the reference budget
    searcher.on_trial_complete("a", final(0.5, 0.6))
    config = searcher.suggest("b")
    assert config["max_stage_prune"] == [0.8, 0.6, 0.5] and config["allocation"] == [1 / 3] * 3
    assert len(searcher.studies[0].trials) == 1 + 2 + 1


@pytest.mark.parametrize("sampler", ["tpe", "random", "gp", "nsga2"])
def test_every_sampler_runs(sampler):
    configs = run_all(CellSearcher(CELLS[:1], 3, RANGES, sampler=sampler, seed=0, n_startup_trials=2))
    assert len(configs) == 3
    configs = run_all(CellSearcher(CELLS[2:], 3, RANGES, sampler=sampler, seed=0, n_startup_trials=2, budget_use=USES))
    assert len(configs) == 3 and all(len(c["allocation"]) == 3 for c in configs)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler 'cmaes'; known: tpe, random, gp, nsga2"):
        CellSearcher(CELLS, 1, RANGES, sampler="cmaes")


# --------------------------------------------------------------------------------------------
# PerCellASHA
# --------------------------------------------------------------------------------------------


def fake_trial(trial_id: str, cell: int):
    """A trial as the scheduler sees it: the Tune config of one trial of grid cell ``cell``."""
    config = {**shared_config({}, {}, 1.0, None), **sample_config(cell, CELLS[cell].key, [0.5] * 3, 0)}
    return SimpleNamespace(trial_id=trial_id, config=config)


def test_asha_compares_trials_only_within_their_cell():
    """Reduction 2, grace 1: a trial below its cell's first result at rung 1 stops. The
    low-FLOPs cell's trial is far below the high-FLOPs cell's but only meets its own cell."""
    asha = PerCellASHA(grace_period=1, reduction_factor=2, max_t=8)
    high, low, low2 = fake_trial("h", 1), fake_trial("l", 0), fake_trial("l2", 0)
    for t in (high, low, low2):
        asha.on_trial_add(None, t)

    def result(acc):
        return {"training_iteration": 1, "val_top1": acc}

    assert asha.on_trial_result(None, high, result(0.9)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, low, result(0.3)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, low2, result(0.1)) == TrialScheduler.STOP
    # the final report (after finalize) never stops a trial
    assert asha.on_trial_result(None, low2, {**result(0.0), FINAL_KEY: True}) == TrialScheduler.CONTINUE


def test_asha_state_survives_save_and_restore(tmp_path):
    asha = PerCellASHA(grace_period=1, reduction_factor=2, max_t=8)
    first, second = fake_trial("a", 0), fake_trial("b", 0)
    asha.on_trial_add(None, first)
    asha.on_trial_result(None, first, {"training_iteration": 1, "val_top1": 0.9})
    asha.save(str(tmp_path / "asha.pkl"))
    restored = PerCellASHA()
    restored.restore(str(tmp_path / "asha.pkl"))
    # a trial restored on resume is registered on first contact
    assert restored.on_trial_result(None, second, {"training_iteration": 1, "val_top1": 0.1}) == TrialScheduler.STOP


def test_asha_keeps_its_own_books():
    """Tune reads the metric, the stop count and the removals through the public API only."""
    asha = PerCellASHA(grace_period=1, reduction_factor=2, max_t=8)
    assert asha.metric == "val_top1"
    first, second, pending = fake_trial("a", 0), fake_trial("b", 0), fake_trial("p", 1)
    for t in (first, second, pending):
        asha.on_trial_add(None, t)
    asha.on_trial_result(None, first, {"training_iteration": 1, "val_top1": 0.9})
    assert asha.on_trial_result(None, second, {"training_iteration": 1, "val_top1": 0.1}) == TrialScheduler.STOP
    asha.on_trial_complete(None, second, {"training_iteration": 1, "val_top1": 0.1})
    asha.on_trial_remove(None, second)  # already completed: nothing to drop
    asha.on_trial_remove(None, pending)  # never ran
    asha.on_trial_remove(None, pending)
    assert asha.debug_string() == "Using per-cell ASHA (2 cells): num_stopped=1"
    # a removed trial that comes back is registered again
    assert asha.on_trial_result(None, pending, {"training_iteration": 1, "val_top1": 0.5}) == TrialScheduler.CONTINUE


def test_a_scheduler_pickled_before_its_own_books_still_unpickles():
    scheduler = PerCellASHA(grace_period=1, reduction_factor=2, max_t=4)
    state = dict(scheduler.__dict__)
    del state["_cell_of"], state["_stopped"]  # what rayprune 0.1 pickled
    old = PerCellASHA.__new__(PerCellASHA)
    old.__setstate__(state)
    restored = pickle.loads(pickle.dumps(old))
    assert restored._cell_of == {} and restored._stopped == 0 and restored.metric == scheduler.metric
