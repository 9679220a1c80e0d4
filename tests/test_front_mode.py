"""The front mode (issue 25): ``grid: {flops_targets: auto}`` searches the accuracy/MACs front with
one multi-objective study per (method, KD weight), then fine-tunes points of its Pareto set."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from rayprune import models
from rayprune.cli import main as cli_main
from rayprune.cli import sweep_main
from rayprune.orchestration.config import SweepConfig, parse_sweep
from rayprune.orchestration.front_mode import (
    FRONT_MODE,
    FrontRounds,
    FrontSearcher,
    hypervolume,
    pareto_indices,
    spread_targets,
    thin_evenly,
)
from rayprune.orchestration.search import FINAL_KEY, Outcome, Reachability
from rayprune.orchestration.sweep import run_sweep
from rayprune.testing.sweeps import mini_sweep
from rayprune.tracking.store import SubnetStore

SPEC = models.full_spec("cifar_resnet:tiny", num_classes=10, shortcut="avgpool_conv")
RANGES = [(0.2, 0.8)] * 3
GROUPS = [("l1", 0.0), ("uniform", 0.0), ("ast", 0.0)]
USE = {"l1": "allocation", "uniform": "target", "ast": "max_rates"}


# --------------------------------------------------------------------------------------------
# The front's arithmetic
# --------------------------------------------------------------------------------------------


def test_pareto_thinning_and_hypervolume_are_exact():
    points = [(0.9, 10.0), (0.8, 5.0), (0.85, 12.0), (0.6, 2.0), (0.6, 3.0), (0.9, 10.0)]
    assert pareto_indices(points) == [3, 1, 0]  # by MACs; dominated and repeated points left out
    assert thin_evenly([0.0, 1.0, 2.0, 4.8, 5.1, 10.0], 3) == [0, 4, 5]
    assert thin_evenly([1.0, 2.0], 8) == [0, 1]
    # the area over reference (0.5, 12): (5-2)*0.1 + (10-5)*0.3 + (12-10)*0.4
    assert hypervolume(points, (0.5, 12.0)) == pytest.approx(0.3 + 1.5 + 0.8)
    assert hypervolume(points, (0.95, 12.0)) == 0.0  # nothing beats the reference's accuracy
    assert spread_targets((0.2, 0.9), 4) == [0.2, 0.433, 0.667, 0.9]


# --------------------------------------------------------------------------------------------
# The studies: suggestions, determinism, resume
# --------------------------------------------------------------------------------------------


def make_rounds(seed: int = 0, sampler: str = "tpe") -> FrontRounds:
    return FrontRounds(
        GROUPS,
        7,
        RANGES,
        (0.2, 0.9),
        sampler=sampler,
        seed=seed,
        n_startup_trials=3,
        feasibility=Reachability(SPEC, 8),
        budget_use=USE,
    )


def val_of(config: dict) -> float:
    return 0.5 + 0.4 * config["flops_target"] - 0.1 * max(config["max_stage_prune"])


def drive(rounds: FrontRounds, order=lambda n: range(n)) -> list[dict]:
    configs = []
    while not rounds.finished():
        batch = [rounds.config(i) for i in range(len(rounds.next_round()))]
        for i in order(len(batch)):
            rounds.report(i, Outcome("complete", val_of(batch[i]), batch[i]["flops_target"] * 0.95))
        configs += batch
    return configs


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2"])  # gp works too, but takes 40 s here
def test_each_study_suggests_targets_over_the_range_with_its_budget(sampler):
    configs = drive(make_rounds(sampler=sampler))
    assert len(configs) == 21 and [c["cell"] for c in configs[:3]] == [0, 1, 2]  # one per study per round
    for cell, (method, _) in enumerate(GROUPS):
        mine = [c for c in configs if c["cell"] == cell]
        targets = [c["flops_target"] for c in mine]
        assert targets[:3] == [0.2, 0.55, 0.9] and all(0.2 <= t <= 0.9 for t in targets)  # spread, then the sampler
        assert len(set(targets)) >= 5 and all(round(t, 3) == t for t in targets)  # nsga2 may repeat one
        assert all(c["method"] == method for c in mine)
        assert all(Reachability(SPEC, 8)(c["flops_target"], c["max_stage_prune"]) <= 0 for c in mine)
        assert ("allocation" in mine[-1]) == (method == "l1")
        if method == "uniform":
            assert all(c["max_stage_prune"] == [0.8] * 3 for c in mine)


def test_one_seed_gives_one_sweep_whatever_order_the_trials_finish_in():
    first = drive(make_rounds(seed=5))
    assert drive(make_rounds(seed=5), order=lambda n: reversed(range(n))) == first
    assert drive(make_rounds(seed=6)) != first


def searcher(seed: int = 1) -> FrontSearcher:
    return FrontSearcher(
        GROUPS[:2], 6, RANGES, (0.2, 0.9), sampler="tpe", seed=seed, n_startup_trials=2, budget_use=USE
    )


def run_searcher(s: FrontSearcher, ids: range, save_to: Path | None = None, stop_after: int | None = None) -> list:
    """Tune's calls: suggest until None/FINISHED, complete each, repeat; with ``save_to``, save
    the state (as Tune's experiment snapshot) after ``stop_after`` suggestions and stop there."""
    configs, running = [], []
    for trial_id in (f"t{i}" for i in ids):
        config = s.suggest(trial_id)
        while config is None:  # the round runs: finish what runs, in reverse order
            for done, c in reversed(running):
                s.on_trial_complete(done, {FINAL_KEY: True, "val_top1": val_of(c), "flops_fraction": 0.9})
            running = []
            config = s.suggest(trial_id)
        if config == "FINISHED":
            break
        configs.append(config)
        running.append((trial_id, config))
        if save_to is not None and len(configs) == stop_after:
            s.save(str(save_to))
            return configs
    return configs


def test_a_resumed_searcher_suggests_what_the_uninterrupted_one_would(tmp_path):
    whole = run_searcher(searcher(), range(100))
    assert len(whole) == 12
    first = run_searcher(searcher(), range(100), tmp_path / "state.pkl", stop_after=5)  # mid-round
    resumed = searcher(seed=99)  # Tune rebuilds it from the snapshot: the seed comes back with it
    resumed.restore(str(tmp_path / "state.pkl"))
    # t4 (the third round's first trial) was running: the resumed sweep finishes it, then goes on
    resumed.on_trial_complete("t4", {FINAL_KEY: True, "val_top1": val_of(first[4]), "flops_fraction": 0.9})
    rest = run_searcher(resumed, range(100, 200))
    assert first + rest == whole
    assert pickle.loads(pickle.dumps(resumed.rounds)).history == resumed.rounds.history


# --------------------------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"flops_targets": "all"}, "grid.flops_targets: give a list of FLOPs targets in (0, 1], or auto"),
        ({"flops_targets": "auto", "target_range": [0.9, 0.3]}, "grid.target_range: must be [low, high] with 0 <"),
        ({"flops_targets": [0.5], "front_points": 4}, "grid: front_points is a front-mode key: set flops_targets"),
        ({"flops_targets": "auto", "front_points": 0}, "grid.front_points: Input should be greater than or equal"),
        ({"flops_targets": "auto", "target_range": [0.001, 0.5]}, "(grid.target_range starts at 0.001; raise it"),
    ],
)
def test_a_bad_front_mode_key_is_one_line_and_exit_2(tmp_path, capsys, grid, message):
    space = tmp_path / "front.yaml"
    space.write_text(yaml.safe_dump(mini_sweep(tmp_path, grid=grid, teacher=None)))
    assert sweep_main(["--space", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_grid_round_trips_and_a_grid_sweep_records_no_front_keys(tmp_path):
    # the driver hands its tasks the dumped config, which they validate again
    grid_cfg = parse_sweep(mini_sweep(tmp_path, teacher=None, grid={"flops_targets": [0.5, 0.7]}))
    front_cfg = parse_sweep(mini_sweep(tmp_path, teacher=None, grid={"flops_targets": "auto", "front_points": 3}))
    assert grid_cfg.model_dump(mode="json")["grid"] == {"flops_targets": [0.5, 0.7], "kd_weights": [0.0]}
    assert front_cfg.model_dump(mode="json")["grid"] == {
        "flops_targets": "auto",
        "kd_weights": [0.0],
        "target_range": [0.2, 0.9],
        "front_points": 3,
    }
    for cfg in (grid_cfg, front_cfg):
        assert SweepConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert (front_cfg.num_trials(), front_cfg.cells(), front_cfg.front_groups()) == (1, [], [("random", 0.0)])


# --------------------------------------------------------------------------------------------
# A digits sweep
# --------------------------------------------------------------------------------------------


def front_sweep(tmp_path: Path) -> dict:
    return mini_sweep(
        tmp_path,
        name="front",
        dataset={"name": "digits"},
        input_size=8,
        teacher=None,
        methods=[{"name": "uniform", "hparams": {"eval_epochs": 1}}],
        grid={"flops_targets": "auto", "target_range": [0.2, 0.9], "front_points": 4},
        optuna={"samples_per_cell": 4, "n_startup_trials": 4, "seed": 0, "stage_prune": [[0.8, 0.9]] * 3},
        recipes={
            "search": {"epochs": 1, "batch_size": 64, "lr": 0.05},
            "finetune": {"epochs": 3, "batch_size": 64, "lr": 0.05},
        },
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "front"},
    )


def outcome_rows(outcome) -> list[dict]:
    return SubnetStore(Path(outcome.experiment_path) / "rayprune" / "subnets.parquet").rows()


def test_a_digits_front_sweep_gives_a_spread_final_front_that_pick_exports(local_ray, tmp_path):
    # 4 trials at the spread targets (0.2 ... 0.9); the Pareto set of their search-val top-1 is fine-tuned
    cfg = parse_sweep(front_sweep(tmp_path))
    outcome = run_sweep(cfg)
    assert outcome.complete and outcome.num_trials == 4
    front = outcome.fronts["final/kd0"]
    macs = [m["macs"] for m in front]
    full = models.macs(cfg.full_spec(), 8)
    assert len(front) >= 3 and (max(macs) - min(macs)) / full >= 0.3, [(m["macs"] / full, m["metrics"]) for m in front]
    assert {m["kind"] for m in front} == {"finetuned"} and {m["source"]["search_mode"] for m in front} == {FRONT_MODE}
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("front")
    runs = client.search_runs([experiment.experiment_id], "params.search_mode = 'front'")
    tuned = [r for r in outcome_rows(outcome) if r["kind"] == "finetuned"]  # the search-val Pareto set, <= 4
    assert len(runs) == len(tuned) >= 3 and {r.info.run_name for r in runs} == {
        f"finetune-uniform_f{r['flops_target']:g}_kd0" for r in tuned
    }
    out = tmp_path / "efficient"
    pick = ["pick", "--experiment", "front", "--mlflow-uri", cfg.tracking.uri, "--mode", "efficient"]
    assert cli_main([*pick, "--max-drop", "1", "--out", str(out), "--onnx-exporter", "torchscript"]) == 0
    assert (out / "spec.json").is_file() and (out / "model.onnx").is_file()
