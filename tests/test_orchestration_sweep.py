"""End-to-end sweeps on a local Ray (2 CPUs, shared by the tests of this module): a 2x2-cell mini
sweep on synthetic data fills MLflow and the Parquet store exactly; an interrupted sweep resumes
without losing or duplicating anything; a digits sweep's pick is served at its 8x8 input."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient
from ray import tune

from rayprune import models
from rayprune.cli import sweep_main as main
from rayprune.methods.base import stage_rates
from rayprune.orchestration.config import load_sweep, parse_sweep
from rayprune.orchestration.search import FINAL_KEY
from rayprune.orchestration.sweep import run_sweep
from rayprune.testing.sweeps import mini_sweep
from rayprune.tracking.pareto import compute_fronts
from rayprune.tracking.store import SubnetStore


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def reported(experiment_path: Path) -> tuple[set, dict]:
    """What the trials reported, from Tune's result.json files: the (trial, step, spec hash) of
    every search subnet, and each trial's final record."""
    from rayprune.models import spec_hash

    search, finals = set(), {}
    for result_file in experiment_path.glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            for s in json.loads(result.get("subnets") or "[]"):
                search.add((result["trial_id"], result["step"], spec_hash(s["spec"])))
            if result.get("final"):
                finals[result["trial_id"]] = json.loads(result["final_record"])
    return search, finals


def store_of(experiment_path: Path) -> SubnetStore:
    return SubnetStore(experiment_path / "rayprune" / "subnets.parquet")


def check_tracking(cfg, experiment_path: Path, cells: list[tuple[float, float]]) -> None:
    """MLflow and Parquet hold exactly what the trials reported, once; ``cells``: the (FLOPs
    target, KD weight) of every trial."""
    rows = store_of(experiment_path).rows()
    search, finals = reported(experiment_path)
    assert {(r["trial_id"], r["step"], r["spec_hash"]) for r in rows if r["kind"] == "search"} == search
    final_rows = {r["trial_id"]: r for r in rows if r["kind"] == "final"}
    assert set(final_rows) == set(finals) and len(finals) == cfg.num_trials()
    for trial_id, record in finals.items():
        assert final_rows[trial_id]["metrics"] == record["metrics"] and final_rows[trial_id]["spec"] == record["spec"]
        window = record["source"]["window"]  # every reported subnet lands in [0.9, 1] x its target's MACs
        assert window["status"] == "in_window" and window["low"] <= record["macs"] <= window["high"]
    assert [r["kind"] for r in rows].count("unpruned") == 1

    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("rayprune.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    trials = [r for r in runs if r.data.tags.get("rayprune.role") == "trial"]
    assert len(trials) == cfg.num_trials()
    assert all(r.data.tags["mlflow.parentRunId"] == parent and r.info.status == "FINISHED" for r in trials)
    for r in trials:  # named like Tune's trials: <method>_f<target>_kd<weight>_<trial id>
        p, trial_id = r.data.params, r.data.tags["rayprune.trial_id"]
        assert r.info.run_name == f"{p['method']}_f{float(p['flops_target']):g}_kd{float(p['kd_weight']):g}_{trial_id}"
    assert (
        sorted((float(r.data.params["flops_target"]), float(r.data.params["kd_weight"])) for r in trials) == cells
    )  # every cell, exactly once
    for r in trials:  # the proposed allocation and the realised per-stage rates: params and parquet
        params, final = r.data.params, final_rows[r.data.tags["rayprune.trial_id"]]
        rates = final["source"]["stage_rates"]
        assert rates == stage_rates(cfg.full_spec(), final["spec"]) and len(rates) == len(cfg.optuna.stage_prune)
        assert [float(params[f"rate_stage{i}"]) for i in range(len(rates))] == rates
        allocation = final["source"].get("allocation")
        if cfg.budget_use()[params["method"]] == "allocation":
            assert [float(params[f"alloc_stage{i}"]) for i in range(len(rates))] == allocation
            assert sum(allocation) == pytest.approx(1.0)
        else:
            assert allocation is None and "alloc_stage0" not in params
    for run in trials:  # one metric point per reported step, even across a resume
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "steps_done")]
        assert sorted(steps) == list(range(len(steps))) and steps
    assert {"subnets.parquet", "pareto"} <= {a.path for a in client.list_artifacts(parent)}
    baseline = next(r for r in rows if r["kind"] == "unpruned")  # measured once: test, robust, latency
    assert {"test_top1", "robust_top1", "latency_ms_b1_p50"} <= set(baseline["metrics"])
    assert baseline["robust_suite"] == 2 and all(r["robust_suite"] == 2 for r in rows if r["kind"] != "search")
    assert parents[0].data.metrics["unpruned_test_top1"] == baseline["metrics"]["test_top1"]
    if cfg.finetune_front:  # every cell's chosen subnet was fine-tuned with recipes.finetune, once
        tuned = [r for r in rows if r["kind"] == "finetuned"]
        assert sorted((r["flops_target"], r["kd_weight"]) for r in tuned) == sorted(cells)
        for r in tuned:  # the chosen subnet: the best search-val accuracy among the cell's trial finals
            cell_finals = [
                f
                for f in final_rows.values()
                if (f["flops_target"], f["kd_weight"]) == (r["flops_target"], r["kd_weight"])
            ]
            assert r["spec_hash"] == max(cell_finals, key=lambda f: f["metrics"]["val_top1"])["spec_hash"]
            epochs = cfg.recipes.finetune["epochs"]
            assert r["recipe"] == f"e{epochs} cosine lr0.1 bs64 kd{r['kd_weight']:g}" and r["init"] == "scratch"
        fronts = compute_fronts(rows)
        for name, members in fronts.items():
            if not name.startswith("search"):  # equally treated: one recipe tag per front, fine-tunes only
                assert len({m["recipe"] for m in members}) == 1 and {m["kind"] for m in members} == {"finetuned"}
        finetunes = [r for r in runs if r.data.tags.get("rayprune.role") == "finetune"]
        assert len(finetunes) == len(cells)
        assert all(
            {"macs", "macs_pct", "test_top1", "test_top1_drop", "robust_top1", "latency_ms"} <= set(r.data.metrics)
            for r in finetunes
        )
        # latency: the baseline and every candidate timed by one task on one node, in the store and the runs
        assert len({json.dumps(r["source"]["latency"], sort_keys=True) for r in [*tuned, baseline]}) == 1
        by_key = {r["run_id"]: r for r in tuned}
        for run in finetunes:
            row = by_key[run.info.run_id]
            assert run.data.metrics["latency_ms"] == row["metrics"]["latency_ms_b1_p50"]
            assert run.data.metrics["latency_ms_b64_spread"] == row["metrics"]["latency_ms_b64_spread"]
            assert run.data.params["latency.node"] == row["source"]["latency"]["node"]
        assert parents[0].data.metrics["unpruned_latency_ms_b1_p50"] == baseline["metrics"]["latency_ms_b1_p50"]


class InterruptOnce(tune.Callback):
    """Sends SIGUSR1 (Tune's graceful stop, like Ctrl-C) when the first trial completes, once:
    the flag file keeps the restored copy of this callback from interrupting again."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.flag):
            Path(self.flag).touch()
            os.kill(os.getpid(), signal.SIGUSR1)


def test_an_interrupted_mini_sweep_resumes_and_fills_mlflow_and_the_subnet_store(local_ray, tmp_path, capsys):
    """A mini sweep of two cells (a teacher, KD 0 and 0.9, the front fine-tuned), stopped once its
    first trial completes, then finished by `rayprune sweep --resume` on another machine: MLflow and
    Parquet hold exactly what the trials reported, once; the printed summary and the pick are those
    of any sweep."""
    grid = {"flops_targets": [0.5], "kd_weights": [0.0, 0.9]}
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(mini_sweep(tmp_path, max_concurrent_trials=1, grid=grid)))
    cfg = load_sweep(tmp_path / "mini.yaml")
    first = run_sweep(cfg, callbacks=[InterruptOnce(str(tmp_path / "interrupted"))], out=io.StringIO())
    assert not first.complete and first.num_trials < cfg.num_trials()
    experiment_path = Path(first.experiment_path)
    assert 1 <= sum(r["kind"] == "final" for r in store_of(experiment_path).rows()) < cfg.num_trials()
    # Resume on another machine whose last upload of the registry predates every search step:
    # the driver must recover those rows from Tune's results (no trial reports them again).
    upload = SubnetStore(tmp_path / "upload" / "subnets.parquet")
    upload.add([r for r in store_of(experiment_path).rows() if r["kind"] != "search"])
    MlflowClient(cfg.tracking.uri).log_artifact(first.parent_run_id, str(upload.path))
    (experiment_path / "rayprune" / "subnets.parquet").unlink()

    capsys.readouterr()
    assert main(["--space", str(tmp_path / "mini.yaml"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert [p for p in (tmp_path / "results").iterdir() if p.name.startswith("mini-")] == [experiment_path]
    check_tracking(cfg, experiment_path, cells=[(0.5, 0.0), (0.5, 0.9)])  # one parent run (the first), every trial once
    assert MlflowClient(cfg.tracking.uri).get_run(first.parent_run_id).info.status == "FINISHED"
    assert "final front [kd0]: test_top1 vs MACs" in out and "robust front [kd0.9]" in out
    assert "unpruned baseline (the teacher): " in out and "Trials per grid cell" in out
    assert f"Browse the runs: mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
    assert re.search(
        r"then open the fine-tuned candidates with their metrics, sorted by MACs: http://127.0.0.1:5000/#/experiments/"
        r"\d+/runs\?workflowType=machine_learning&viewStateShareKey=rayprune-candidates\n",
        out,
    )
    assert f"rayprune pick --experiment {cfg.tracking.experiment} --mlflow-uri sqlite:///{tmp_path}/mlflow.db" in out
    assert (experiment_path / "teacher" / "weights.pt").is_file()
    # What the user does next: export the efficient point straight from the sweep's store.
    from rayprune.cli import main as cli_main

    assert (
        cli_main(
            [
                "pick",
                "--experiment",
                cfg.tracking.experiment,
                "--mlflow-uri",
                f"sqlite:///{tmp_path}/mlflow.db",
                "--mode",
                "efficient",
                "--max-drop",
                "1",
                "--out",
                str(tmp_path / "eff"),
                "--onnx-exporter",
                "torchscript",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "eff").iterdir()) == [
        "model.onnx",
        "model_card.md",
        "spec.json",
        "weights.pt",
    ]


class KillWorkerOnce(tune.Callback):
    """SIGKILLs the trial's worker process (a crash) once its first checkpoint is registered."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not os.path.exists(self.flag):
            Path(self.flag).touch()
            os.kill(trial.last_result["pid"], signal.SIGKILL)


def test_a_crashed_trial_is_retried_from_its_last_checkpoint(local_ray, tmp_path):
    cfg = parse_sweep(
        mini_sweep(
            tmp_path,
            grid={"flops_targets": [0.6], "kd_weights": [0.0]},
            teacher=None,
            methods=[{"name": "random", "hparams": {"samples": 3, "eval_epochs": 1}}],
            finetune_front=False,
            max_failures=1,
        )
    )
    outcome = run_sweep(cfg, callbacks=[KillWorkerOnce(str(tmp_path / "killed"))])
    assert (tmp_path / "killed").exists() and outcome.complete
    experiment_path = Path(outcome.experiment_path)
    (result_file,) = experiment_path.glob("*/result.json")
    results = [json.loads(line) for line in result_file.read_text().splitlines()]
    # The kill is sent after step 1's checkpoint, but the worker may have reported more before it
    # died (a race): whatever it got to, a new worker takes over from the last checkpoint. On a
    # loaded machine the driver can see that checkpoint only after the trial finished: the kill
    # then hits an idle worker, and the records must be those of an undisturbed trial.
    # Tune may also keep only the restored worker's lines in result.json. Either way: steps never
    # go back, 3 steps, one final, and the first line is step 1 or a restore from a checkpoint.
    if len({r["pid"] for r in results}) == 1:
        assert all(a["steps_done"] <= b["steps_done"] for a, b in itertools.pairwise(results))
        assert results[-1]["steps_done"] == 3 and [r[FINAL_KEY] for r in results].count(True) == 1
        first = results[0]
        assert first["steps_done"] == 1 or first["steps_done"] > first["iterations_since_restore"]
        if first["steps_done"] == 1:  # the whole history: the records must match it
            check_tracking(cfg, experiment_path, cells=[(0.6, 0.0)])
        # else result.json lost the killed worker's lines, which the store keeps: it is no reference
        return
    assert len({r["pid"] for r in results}) == 2  # a new worker took over ...
    first = next(i for i, r in enumerate(results) if r["pid"] != results[0]["pid"])
    before, after = results[:first], results[first:]
    assert [r["steps_done"] for r in before] in ([1], [1, 2], [1, 2, 3], [1, 2, 3, 3])
    assert after[0]["iterations_since_restore"] == 1  # ... restored, not started afresh ...
    assert after[0]["steps_done"] in (before[-1]["steps_done"], before[-1]["steps_done"] + 1)  # ... where it was
    assert all(a["steps_done"] <= b["steps_done"] for a, b in itertools.pairwise(results))
    assert after[-1]["steps_done"] == 3 and [r[FINAL_KEY] for r in after].count(True) == 1  # 3 steps, one final
    check_tracking(cfg, experiment_path, cells=[(0.6, 0.0)])


def published_rows(uri: str) -> list[dict]:
    """The registry rows the sweep's driver has published to its parent run so far (none yet: [])."""
    from rayprune.tracking import TrackingError
    from rayprune.tracking.lookup import connect, find_experiment, find_sweep_run, sweep_rows

    try:
        client = connect(uri, must_exist=True)
        return sweep_rows(client, find_sweep_run(client, find_experiment(client, "mini")))
    except TrackingError:
        return []


def read_results(result_file: Path) -> list[dict]:
    return [json.loads(line) for line in result_file.read_text().splitlines() if line]


def test_a_sigkilled_driver_keeps_what_it_finished_and_resumes(local_ray, tmp_path, capsys, monkeypatch):
    """The real thing, end to end: `rayprune sweep` in its own process (joining this module's
    Ray, as a driver joins a cluster) is SIGKILLed (no handler runs) once its first finished
    trial is published; `front` still shows that trial and says the sweep was interrupted;
    `--resume` finishes the sweep without running a finished trial again, and every record is
    there once."""
    from rayprune.cli import main as cli_main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = ray.get_runtime_context().gcs_address
    cells = [0.5, 0.6, 0.7]  # one trial at a time: the kill after the first leaves two unfinished
    (tmp_path / "mini.yaml").write_text(
        yaml.safe_dump(
            mini_sweep(
                tmp_path,
                teacher=None,
                finetune_front=False,
                max_concurrent_trials=1,
                grid={"flops_targets": cells, "kd_weights": [0.0]},
            )
        )
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rayprune = [str(Path(sys.executable).with_name("rayprune")), "sweep", "--space", "mini.yaml", "--address", address]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(rayprune, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600  # a bound for a loaded machine, not a timing
        # Tune's first result comes after the driver created the MLflow database: reading it
        # while MLflow creates its tables can collide with that (both run its migrations).
        while (
            not list(tmp_path.glob("results/mini-*/*/result.json"))
            and driver.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        while not published_rows(uri) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        driver.kill()  # SIGKILL
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    (experiment_path,) = (tmp_path / "results").glob("mini-*")
    published = {r["trial_id"]: r for r in published_rows(uri) if r["kind"] == "final"}
    assert 1 <= len(published) < len(cells)  # the sweep was cut short after a published trial

    # `front` shows what was finished and names the interruption (it writes nothing).
    capsys.readouterr()
    assert cli_main(["front", "--experiment", "mini", "--mlflow-uri", uri]) == 0
    shown = capsys.readouterr()
    assert "final front [kd0]" in shown.out and all(trial[:8] in shown.out for trial in published)
    assert shown.err.startswith(f"rayprune: note: sweep {experiment_path.name} was interrupted (its driver ")
    assert shown.err.endswith(f"resume it with: rayprune sweep --space mini.yaml --resume {experiment_path.name}\n")

    resumed = subprocess.run([*rayprune, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "final front [kd0]" in resumed.stdout
    assert [p.name for p in (tmp_path / "results").glob("mini-*")] == [experiment_path.name]  # the same sweep
    # Nothing finished was trained again, and no search step ran twice. (A trial that finished
    # just before the kill may not be recorded as finished in Tune's state yet: Tune then resumes
    # it after its last step, and its final training comes from the sweep's cache, with the
    # metrics measured the first time.)
    results = {rs[0]["trial_id"]: rs for rs in map(read_results, experiment_path.glob("*/result.json"))}
    assert len(results) == len(cells)
    assert all(
        [r["steps_done"] for r in rs if not r[FINAL_KEY]] == [1, 2] and rs[-1][FINAL_KEY] for rs in results.values()
    )
    for trial, row in published.items():
        final = json.loads(results[trial][-1]["final_record"])
        assert final["source"]["trained_by"] == trial and final["metrics"] == row["metrics"]
    rows = published_rows(uri)
    finals = [r for r in rows if r["kind"] == "final"]
    assert sorted(r["trial_id"] for r in finals) == sorted(results)  # one final per trial
    assert sorted(r["flops_target"] for r in finals) == cells
    # 2 random samples per trial, none twice (an interrupted trial's steps stay recorded under it)
    assert sum(r["kind"] == "search" and r["trial_id"] in results for r in rows) == len(cells) * 2
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mini").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("rayprune.role") == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags["rayprune.status"] == "finished"
    trials = [r for r in runs if r.data.tags.get("rayprune.role") == "trial"]
    assert sorted(r.data.tags["rayprune.trial_id"] for r in trials if r.info.status == "FINISHED") == sorted(results)
    # A trial the dead driver had started but Tune had not saved yet is closed as interrupted
    # (its cell ran again as a new trial), never left RUNNING.
    assert all(
        r.info.status == "KILLED" and r.data.tags["rayprune.status"] == "interrupted"
        for r in trials
        if r.data.tags["rayprune.trial_id"] not in results
    )


def test_resume_without_a_sweep_to_resume_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(mini_sweep(tmp_path)))
    assert main(["--space", str(tmp_path / "mini.yaml"), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"rayprune: error: no sweep named mini-* to resume under "
        f"{tmp_path}/results; run without --resume to start one\n"
    )


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


@pytest.fixture(scope="module")
def digits_sweep(local_ray, tmp_path_factory):
    """The quickstart's shape, once for the tests below: digits at 8x8 (learnable in a few
    epochs), targets far apart, no teacher. Returns the config and the outcome."""
    tmp_path = tmp_path_factory.mktemp("digits")
    cfg = parse_sweep(
        mini_sweep(
            tmp_path,
            dataset={"name": "digits"},
            input_size=8,
            teacher=None,
            methods=[{"name": "uniform", "hparams": {"eval_epochs": 1}}],
            grid={"flops_targets": [0.3, 0.9], "kd_weights": [0.0]},
            optuna={"samples_per_cell": 1, "seed": 0, "stage_prune": [[0.8, 0.9]] * 3},
            recipes={
                "search": {"epochs": 1, "batch_size": 64, "lr": 0.05},
                "finetune": {"epochs": 4, "batch_size": 64, "lr": 0.05},
            },
        )
    )
    return cfg, run_sweep(cfg)


def test_final_front_covers_the_macs_axis(digits_sweep):
    # the equally-treated final front has a point at each target, and every reported subnet is in its window
    _, outcome = digits_sweep
    front = outcome.fronts["final/kd0"]
    assert len(front) > 1 and {m["flops_target"] for m in front} == {0.3, 0.9}
    assert {m["recipe"] for m in front} == {"e4 cosine lr0.05 bs64 kd0"} and {m["kind"] for m in front} == {"finetuned"}
    rows = store_of(Path(outcome.experiment_path)).rows()
    finals = [r for r in rows if r["kind"] == "final"]
    assert len(finals) == 2 and all(r["source"]["window"]["status"] == "in_window" for r in finals)
    baseline = next(r for r in rows if r["kind"] == "unpruned")  # no teacher: trained once with recipes.finetune
    assert baseline["source"]["recipe_tag"] == "e4 cosine lr0.05 bs64 kd0" and baseline["init"] == "scratch"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextlib.contextmanager
def served_model(model_uri: str, tracking_uri: str, timeout_s: float = 300.0):
    """Start ``mlflow models serve --env-manager local`` on a free loopback port; yields a function
    that waits (bounded) until /ping answers and returns the base URL, so the caller can work
    while the server starts. The server's process group is always killed afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # it execs uvicorn
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: uvicorn and its worker die with it
    )
    deadline = time.monotonic() + timeout_s

    def wait_up() -> str:
        base = f"http://127.0.0.1:{port}"
        while True:
            assert server.poll() is None, f"mlflow models serve exited: {server.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"mlflow models serve did not answer /ping within {timeout_s:g} s"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        return base
            except OSError:
                time.sleep(0.25)

    try:
        yield wait_up
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone when the server failed to start
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        server.stderr.close()


def test_the_digits_pick_predicts_8x8_batches_through_pyfunc_and_rest(digits_sweep, tmp_path, monkeypatch):
    """The quickstart's bug: the efficient pick of a sweep trained on 8x8 digits was registered
    for 32x32 input. Its ONNX model, signature and card now take 8x8 batches, answer like torch,
    and refuse 32x32 ones through mlflow.pyfunc and over REST."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from rayprune import models
    from rayprune.cli import main as cli_main
    from rayprune.models import subnet_io

    cfg, outcome = digits_sweep
    tuned = sorted((Path(outcome.experiment_path) / "rayprune" / "finetuned").iterdir())  # what MLflow got
    assert len(tuned) == 2 and {subnet_io.load(d).input_size for d in tuned} == {8}  # saved, not derived
    uri, out = cfg.tracking.uri, tmp_path / "efficient"
    pick = ["pick", "--experiment", cfg.tracking.experiment, "--mlflow-uri", uri, "--mode", "efficient"]
    assert cli_main([*pick, "--max-drop", "1", "--out", str(out), "--onnx-exporter", "torchscript"]) == 0
    model_uri = f"models:/rayprune-{cfg.tracking.experiment}@efficient"
    with served_model(model_uri, uri) as server_url:  # it starts while pyfunc is checked
        spec = json.loads((out / "spec.json").read_text())
        net = models.build(spec)
        net.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
        x8, x32 = (torch.randn(4, 3, n, n, generator=torch.Generator().manual_seed(n)).numpy() for n in (8, 32))
        with torch.no_grad():
            want = net.eval()(torch.from_numpy(x8)).numpy()
        card = (out / "model_card.md").read_text()
        assert f"* family: `cifar_resnet`, input 3x8x8, {spec['num_classes']} classes" in card
        assert "* input: float32 tensor [batch, 3, 8, 8]" in card and "x32" not in card

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
        loaded = mlflow.pyfunc.load_model(model_uri)
        assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 3, 8, 8)
        assert np.abs(loaded.predict(x8)["logits"] - want).max() <= 1e-4
        with pytest.raises(MlflowException, match=r"does not match expected shape \(-1, 3, 8, 8\)") as refused:
            loaded.predict(x32)
        assert refused.value.error_class == "SCHEMA_ENFORCEMENT_FAILED"

        base = server_url()
        status, body = post_json(f"{base}/invocations", {"inputs": x8.tolist()})
        assert status == 200, body
        assert np.abs(np.asarray(json.loads(body)["predictions"]["logits"]) - want).max() <= 1e-4
        status, body = post_json(f"{base}/invocations", {"inputs": x32.tolist()})
        assert status == 400 and json.loads(body)["error_class"] == "SCHEMA_ENFORCEMENT_FAILED", body[-500:]
        assert "does not match expected shape (-1, 3, 8, 8)" in json.loads(body)["message"]


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


def test_a_driver_interrupted_during_the_front_finetune_keeps_the_finished_members(
    local_ray, tmp_path, monkeypatch, capsys
):
    """Ctrl-C in the driver once the first cell's fine-tune is logged (each trial and fine-tune
    takes both CPUs, so the other one is running, and is cancelled, or has just finished): the
    resume fine-tunes only the missing cell, never a finished one again, and ends with the records
    of an undisturbed run."""
    from rayprune.orchestration import cell_finetune
    from rayprune.orchestration.cache import FinalCache

    overrides = dict(
        grid={"flops_targets": [0.5, 0.7], "kd_weights": [0.0]},
        teacher=None,
        resources={"cpu": 2},
        max_concurrent_trials=1,  # a recipe unlike the trials' own finals:
        recipes={
            "search": {"epochs": 1, "batch_size": 64, "lr": 0.05},  # every fine-tune is a
            "finetune": {"epochs": 1, "batch_size": 64},
        },
    )  # new training
    cells = [(0.5, 0.0), (0.7, 0.0)]

    def finetunes(outcome) -> dict[str, tuple[str, dict]]:
        """cell -> (spec hash, metrics but latency) of its fine-tuned member in the subnet store."""
        return {
            r["flops_target"]: (r["spec_hash"], {k: v for k, v in r["metrics"].items() if "latency" not in k})
            for r in store_of(Path(outcome.experiment_path)).rows()
            if r["kind"] == "finetuned"
        }

    def trained_members(cache: FinalCache) -> dict[str, tuple[int, bytes, bytes]]:
        """The cache's fine-tune entries: key -> (metrics.json mtime, metrics.json, weights.pt)."""
        out = {}
        for key in cache:
            folder = Path(cache.root) / key
            record = json.loads((folder / "metrics.json").read_text())
            if str(record["source"].get("trained_by", "")).startswith("finetune:"):
                out[key] = (
                    (folder / "metrics.json").stat().st_mtime_ns,
                    (folder / "metrics.json").read_bytes(),
                    (folder / "weights.pt").read_bytes(),
                )
        return out

    log_member, logged = cell_finetune._log_cell_finetune, []

    def interrupt_after_the_first(tracker, cache, driver_dir, choice, key, cached):
        log_member(tracker, cache, driver_dir, choice, key, cached)
        logged.append(key)
        if len(logged) == 1:
            raise KeyboardInterrupt  # what Ctrl-C does in the driver's ray.wait

    cfg = parse_sweep(mini_sweep(tmp_path, **overrides))
    monkeypatch.setattr(cell_finetune, "_log_cell_finetune", interrupt_after_the_first)
    first = run_sweep(cfg, space="mini.yaml")
    monkeypatch.undo()
    assert not first.complete and first.num_trials == cfg.num_trials() and len(logged) == 1
    cache = FinalCache.of_experiment(first.experiment_path)
    kept = trained_members(cache)
    # The finished member is kept. The other one was running when Ctrl-C came and is cancelled,
    # unless it finished while the driver logged the first (a loaded machine): then it is kept too.
    assert logged[0] in kept and len(kept) <= len(cells)
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "KILLED" and parent.data.tags["rayprune.status"] == "interrupted"
    assert (
        parent.data.tags["mlflow.note.content"] == "interrupted; resume with: rayprune sweep --space mini.yaml "
        f"--resume {first.sweep_id}"
    )
    assert len(finetunes(first)) == 1  # logged as it finished
    out = capsys.readouterr().out
    assert "Trials per grid cell" not in out and "final front" not in out and "Export an operating point" not in out

    second = run_sweep(cfg, resume="latest")
    assert second.complete and second.parent_run_id == first.parent_run_id
    out, missing = capsys.readouterr().out, len(cells) - len(kept)
    if missing:  # only the missing cell is fine-tuned
        assert (
            f"Fine-tuning the chosen subnet of {missing} grid cell(s) with recipes.finetune "
            f"({len(kept)} already in the cache)" in out
        )
    else:
        assert "Fine-tuning the chosen subnet" not in out
    after = trained_members(cache)
    assert len(after) == len(cells) and all(after[key] == kept[key] for key in kept)  # not trained again
    check_tracking(cfg, Path(second.experiment_path), cells=cells)
    assert finetunes(second) == undisturbed_finetunes(cfg, second.experiment_path, tmp_path / "undisturbed")


def undisturbed_finetunes(cfg, experiment_path: str, scratch: Path) -> dict[float, tuple[str, dict]]:
    """FLOPs target -> (spec hash, metrics) of each cell's chosen subnet fine-tuned without any
    interruption: the sweep's own fine-tune task body, run here on the trials' results, each into a
    scratch cache of its own. What the records of a sweep that was never interrupted hold."""
    from rayprune.orchestration import cell_finetune
    from rayprune.orchestration.cache import FinalCache
    from rayprune.orchestration.trainable import run_tune_trial

    out = {}
    for i, choice in enumerate(
        cell_finetune.choose_per_cell(tune.Tuner.restore(experiment_path, run_tune_trial).get_results())
    ):
        root = scratch / str(i)
        member_cfg = cell_finetune._member_config(cfg, choice.spec)
        cell_finetune._finetune_member_task(member_cfg, choice.record, choice.result.checkpoint, str(root), choice.cell)
        ((record, _),) = [FinalCache(str(root)).get(key) for key in FinalCache(str(root))]
        metrics = {k: v for k, v in record["metrics"].items() if "latency" not in k}
        out[choice.spec.flops_target] = (models.spec_hash(record["spec"]), metrics)
    return out
