"""End-to-end sweeps on a local Ray (2 CPUs, shared by the tests of this module): what a finished
sweep records (duplicates trained once, l1 allocations), and the one-line refusals of the sweep
command. Interrupted sweeps: test_sweep_interrupts; a digits sweep's front and its pick served
at 8x8: test_front_mode."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient
from sweep_checks import check_tracking, store_of

from rayprune.cli import sweep_main as main
from rayprune.orchestration.config import parse_sweep
from rayprune.orchestration.sweep import run_sweep
from rayprune.testing.sweeps import mini_sweep


def test_resume_without_a_sweep_to_resume_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(mini_sweep(tmp_path)))
    assert main(["--space", str(tmp_path / "mini.yaml"), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"rayprune: error: no sweep named mini-* to resume under "
        f"{tmp_path}/results; run without --resume to start one\n"
    )


def test_a_sweep_whose_tune_state_was_cut_short_is_refused_in_one_line(tmp_path, capsys):
    """An empty experiment state (as a copy cut short by a kill leaves it) would make Tune start
    the sweep again from nothing under the old id; rayprune says so instead, and writes nothing."""
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(mini_sweep(tmp_path)))
    state = tmp_path / "results" / "mini-20261207-181455" / "experiment_state-2026-12-07_18-14-54.json"
    state.parent.mkdir(parents=True)
    state.write_text("")
    (state.parent / "tuner.pkl").write_bytes(b"\x80\x05N.")  # what makes it a Tune experiment
    assert main(["--space", str(tmp_path / "mini.yaml"), "--resume"]) == 2
    assert capsys.readouterr().err == (
        "rayprune: error: sweep mini-20261207-181455 cannot be resumed: its Tune state "
        "experiment_state-2026-12-07_18-14-54.json (0 bytes) is not valid JSON; start a new sweep "
        "(its finished subnets stay in MLflow and the subnet store)\n"
    )
    assert sorted(p.name for p in state.parent.iterdir()) == [state.name, "tuner.pkl"] and state.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini.yaml", "results"]


def test_a_local_ray_without_gpus_refuses_gpu_trials(local_ray, tmp_path):
    from rayprune.orchestration.sweep import SweepError

    cfg = parse_sweep(mini_sweep(tmp_path, resources={"cpu": 1, "gpu": 0.5}))
    with pytest.raises(
        SweepError,
        match=r"^resources.gpu: each trial asks for 0.5 GPUs but this machine's Ray "
        r"has 0; lower resources.gpu or join a cluster with --address auto$",
    ):
        run_sweep(cfg)
    assert not (tmp_path / "results").exists()


def test_missing_cifar_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    from rayprune.engine import data

    def offline(name, root):
        raise OSError("offline")

    monkeypatch.setattr(data, "_download_cifar", offline)  # CI may have a network: never download here
    raw = mini_sweep(tmp_path, dataset={"name": "cifar10", "data_dir": str(tmp_path / "nodata")})
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--space", str(tmp_path / "mini.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"rayprune: error: cifar10 not found (looked in {tmp_path}/nodata/cifar-10-batches-py; "
            "download failed: OSError: offline)"
        )
        and err.count("\n") == 1
    )
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_bad_input_raised_in_a_ray_task_is_its_own_line(tmp_path, capsys, monkeypatch):
    from rayprune.engine.data import DataError
    from rayprune.orchestration import sweep

    def teacher_task_fails(*args, **kwargs):
        raise ray.exceptions.RayTaskError(
            "_train_teacher_task", "Traceback ...\n  File ...", DataError("imagenet not found (looked in /x)")
        ).as_instanceof_cause()

    monkeypatch.setattr(sweep, "run_sweep", teacher_task_fails)
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(mini_sweep(tmp_path)))
    assert main(["--space", str(tmp_path / "mini.yaml")]) == 2
    assert capsys.readouterr().err == "rayprune: error: imagenet not found (looked in /x)\n"


def test_a_sweep_with_failed_trials_exits_non_zero_with_the_resume_command(tmp_path, capsys, monkeypatch):
    from rayprune.orchestration import sweep

    outcome = sweep.SweepOutcome("mini-1", str(tmp_path / "results" / "mini-1"), "run", True, 4, failed_trials=1)
    monkeypatch.setattr(sweep, "run_sweep", lambda *args, **kwargs: outcome)
    space = tmp_path / "mini.yaml"
    space.write_text(yaml.safe_dump(mini_sweep(tmp_path)))
    assert main(["--space", str(space)]) == 1
    assert capsys.readouterr().err == (
        f"rayprune: error: 1 of 4 trials failed (their error.txt is under {tmp_path}/results/mini-1); fix the "
        f"cause, then retry them with: rayprune sweep --space {space} --resume mini-1\n"
    )


def test_duplicate_specs_in_a_cell_are_trained_once_and_the_sweep_says_so(local_ray, tmp_path, capsys):
    # uniform ignores maximum rates that do not bind: with Optuna choosing them only (allocation off,
    # so the cell runs 2 trials), both trials of the cell choose one subnet
    cfg = parse_sweep(
        mini_sweep(
            tmp_path,
            grid={"flops_targets": [0.5], "kd_weights": [0.0]},
            teacher=None,
            methods=[{"name": "uniform", "hparams": {"eval_epochs": 1}}],
            optuna={"samples_per_cell": 2, "seed": 0, "stage_prune": [[0.7, 0.8]] * 3, "allocation": False},
            recipes={"search": {"epochs": 1, "batch_size": 64}, "finetune": {"epochs": 1, "batch_size": 64}},
            max_concurrent_trials=1,
        )
    )
    outcome = run_sweep(cfg)
    assert outcome.complete
    experiment_path = Path(outcome.experiment_path)
    rows = store_of(experiment_path).rows()
    finals = [r for r in rows if r["kind"] == "final"]
    assert len(finals) == 2 and len({r["spec_hash"] for r in finals}) == 1
    trained = [r for r in finals if "reused_from" not in r["source"]]
    reused = [r for r in finals if r["source"].get("reused_from")]
    assert len(trained) == 1 and len(reused) == 1
    assert (
        reused[0]["source"]["reused_from"] == trained[0]["trial_id"] and reused[0]["metrics"] == trained[0]["metrics"]
    )
    # the search recipe and the final recipe are equal here: the end-of-sweep fine-tune reuses it too,
    # and the no-teacher baseline is the unpruned net trained once with recipes.finetune
    (tuned,) = [r for r in rows if r["kind"] == "finetuned"]
    assert tuned["metrics"]["test_top1"] == trained[0]["metrics"]["test_top1"]
    entries = [k for k in os.listdir(experiment_path / "final_cache")]
    assert sorted(entries) == ["baseline", "uniform_f0.5_kd0"]
    assert len(os.listdir(experiment_path / "final_cache" / "uniform_f0.5_kd0")) == 1  # one training in all
    out = capsys.readouterr().out
    assert out.count("cell uniform_f0.5_kd0: its 2 trials all chose the same subnet") == 1
    assert re.search(r"uniform_f0.5_kd0\s+trials 2\s+distinct 1\s+reused 1", out)
    parent = MlflowClient(cfg.tracking.uri).get_run(outcome.parent_run_id)
    assert parent.data.tags["rayprune.budgets_do_not_bind.uniform_f0.5_kd0"] == "true"
    assert parent.data.metrics["cells/uniform_f0.5_kd0/reused_trials"] == 1


def test_l1_trials_under_different_allocations_choose_different_subnets(local_ray, tmp_path, capsys):
    # a quickstart l1 cell (digits, cifar_resnet:tiny at 8x8, its stage ranges): maximum rates alone
    # rarely bind l1's global ranking (issue 20: 3 of the quickstart's 4 l1 cells chose one subnet);
    # the allocation Optuna proposes moves it
    cfg = parse_sweep(
        mini_sweep(
            tmp_path,
            dataset={"name": "digits"},
            input_size=8,
            teacher=None,
            methods=[{"name": "l1", "hparams": {"pretrain_epochs": 1, "bn_recal_batches": 1}}],
            grid={"flops_targets": [0.5], "kd_weights": [0.0]},
            optuna={"samples_per_cell": 2, "seed": 0, "stage_prune": [[0.2, 0.8]] * 3},
            recipes={"search": {"epochs": 1, "batch_size": 64}, "finetune": {"epochs": 1, "batch_size": 64}},
            finetune_front=False,
        )
    )
    outcome = run_sweep(cfg)
    assert outcome.complete
    check_tracking(cfg, Path(outcome.experiment_path), cells=[(0.5, 0.0)] * 2)
    out = capsys.readouterr().out
    assert re.search(r"l1_f0.5_kd0\s+trials 2\s+distinct 2\s+reused 0\s+outside 0", out)
    assert "all chose the same subnet" not in out
    # the shared study's progress is on the parent run, from the searcher's two told rounds
    files = {f.path for f in MlflowClient(cfg.tracking.uri).list_artifacts(outcome.parent_run_id, "studies")}
    assert files == {"studies/best_objective.png", "studies/trials.json"}


def test_the_tracking_callback_finds_only_its_own_live_tracker():
    """The callback is pickled with the experiment and unpickled on --resume: it holds only the
    sweep id and finds the tracker run_sweep bound for the sweep's duration."""
    import pickle
    from types import SimpleNamespace

    from rayprune.orchestration import sweep as sweep_module

    callback = pickle.loads(pickle.dumps(sweep_module.TrackingCallback("s1")))
    with pytest.raises(RuntimeError, match="no live tracker"):
        _ = callback.tracker
    live = sweep_module._LIVE_TRACKER.set(SimpleNamespace(sweep_id="s2"))
    try:
        with pytest.raises(RuntimeError, match="no live tracker"):
            _ = callback.tracker
    finally:
        sweep_module._LIVE_TRACKER.reset(live)
    tracker = SimpleNamespace(sweep_id="s1")
    live = sweep_module._LIVE_TRACKER.set(tracker)
    try:
        assert callback.tracker is tracker
    finally:
        sweep_module._LIVE_TRACKER.reset(live)
