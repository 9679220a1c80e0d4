"""Interrupted sweeps on the shared local Ray (2 CPUs; conftest.SHARED_RAY_MODULES): Ctrl-C after
the first trial, a crashed trial worker, a SIGKILLed driver process, Ctrl-C during the front's
fine-tunes. Each resumes without losing or duplicating anything, and ends with the records of an
undisturbed run, wherever the fault lands."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
import yaml
from mlflow import MlflowClient
from ray import tune
from sweep_checks import EXPORTED_FILES, check_tracking, pick_efficient, store_of

from rayprune import models
from rayprune.cli import sweep_main as main
from rayprune.orchestration.config import load_sweep, parse_sweep
from rayprune.orchestration.search import FINAL_KEY
from rayprune.orchestration.sweep import run_sweep
from rayprune.testing.sweeps import mini_sweep
from rayprune.tracking.store import SubnetStore


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
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert pick_efficient(cfg.tracking.experiment, uri, tmp_path / "eff") == EXPORTED_FILES


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


def test_a_sigkilled_driver_keeps_what_it_finished_and_resumes(
    local_ray, tmp_path, capsys, monkeypatch, migrated_mlflow_store
):
    """The real thing, end to end: `rayprune sweep` in its own process (joining the shared
    Ray, as a driver joins a cluster) is SIGKILLed (no handler runs) once its first finished
    trial is published; `front` still shows that trial and says the sweep was interrupted;
    `rayprune sweep --resume` finishes the sweep without running a finished trial again, and
    every record is there once."""
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
    uri = migrated_mlflow_store(tmp_path / "mlflow.db")  # the driver's own migrations: seconds of CPU
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
        # trial id -> its final row, as published before the kill (read before it: just after a
        # SIGKILL the tracking store can be unreadable for a moment, and it would read as empty)
        published: dict[str, dict] = {}
        while not published and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            published = {r["trial_id"]: r for r in published_rows(uri) if r["kind"] == "final"}
        driver.kill()  # SIGKILL
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    (experiment_path,) = (tmp_path / "results").glob("mini-*")
    assert 1 <= len(published) < len(cells)  # the sweep was cut short after a published trial

    # `front` shows what was finished and names the interruption (it writes nothing).
    capsys.readouterr()
    assert cli_main(["front", "--experiment", "mini", "--mlflow-uri", uri]) == 0
    shown = capsys.readouterr()
    assert "final front [kd0]" in shown.out and all(trial[:8] in shown.out for trial in published)
    assert shown.err.startswith(f"rayprune: note: sweep {experiment_path.name} was interrupted (its driver ")
    assert shown.err.endswith(f"resume it with: rayprune sweep --space mini.yaml --resume {experiment_path.name}\n")

    # The resume runs in this process (the CLI's code path, joining the same Ray): a second
    # driver process would only import everything again.
    monkeypatch.chdir(tmp_path)
    assert cli_main(["sweep", "--space", "mini.yaml", "--address", address, "--resume"]) == 0
    assert "final front [kd0]" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "results").glob("mini-*")] == [experiment_path.name]  # the same sweep
    # Nothing finished was trained again, and no search step ran twice. (A trial that finished
    # just before the kill may not be recorded as finished in Tune's state yet: Tune then resumes
    # it after its last step, and its final training comes from the sweep's cache, with the
    # metrics measured the first time.)
    # The trials of the finished sweep: not a folder the dead driver's trial left before Tune
    # saved it (that trial never reports again; its cell ran as a new trial).
    from rayprune.orchestration.trainable import run_tune_trial

    grid = tune.Tuner.restore(str(experiment_path), run_tune_trial).get_results()
    results = {rs[0]["trial_id"]: rs for rs in (read_results(Path(r.path) / "result.json") for r in grid)}
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
        checkpoint = cell_finetune.checkpoint_location(choice.result)
        cell_finetune._finetune_member_task(member_cfg, choice.record, checkpoint, str(root), choice.cell)
        ((record, _),) = [FinalCache(str(root)).get(key) for key in FinalCache(str(root))]
        metrics = {k: v for k, v in record["metrics"].items() if "latency" not in k}
        out[choice.spec.flops_target] = (models.spec_hash(record["spec"]), metrics)
    return out


def test_local_storage_files_appear_whole_or_not_at_all(tmp_path):
    """Tune rewrites its experiment state by copying it over the old one. Through the filesystem
    a sweep gives Tune for a local storage path, a file being written (as a driver killed at that
    moment leaves it) still reads as the old one; closed, it reads as the new one; a folder uploads
    the way Tune uploads a checkpoint; the filesystem survives pickling (Tune ships it to trials).
    Object storage keeps the filesystem Tune infers."""
    import pickle

    import pyarrow.fs

    from rayprune.orchestration.storage import tune_storage

    path, fs = tune_storage(str(tmp_path))
    assert path == str(tmp_path) and tune_storage("s3://bucket/sweeps") == ("s3://bucket/sweeps", None)
    state = tmp_path / "experiment_state-2026.json"
    state.write_text('{"trial_data": []}')
    stream = fs.open_output_stream(str(state))
    stream.write(b'{"trial_data": [1')
    assert state.read_text() == '{"trial_data": []}'  # what a SIGKILL here leaves
    stream.write(b"]}")
    stream.close()
    assert state.read_text() == '{"trial_data": [1]}'
    assert [p.name for p in tmp_path.iterdir()] == [state.name]  # no temporary file left
    assert oct(state.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    checkpoint = tmp_path / "local" / "checkpoint_000001"
    (checkpoint / "final").mkdir(parents=True)
    (checkpoint / "final" / "weights.pt").write_bytes(bytes(range(256)) * 4096)
    fs = pickle.loads(pickle.dumps(fs))
    pyarrow.fs.copy_files(str(checkpoint), str(tmp_path / "trial" / checkpoint.name), destination_filesystem=fs)
    uploaded = tmp_path / "trial" / checkpoint.name / "final" / "weights.pt"
    assert uploaded.read_bytes() == (checkpoint / "final" / "weights.pt").read_bytes()
    assert sorted(p.name for p in uploaded.parent.iterdir()) == ["weights.pt"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
