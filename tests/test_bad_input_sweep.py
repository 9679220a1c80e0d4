"""Bad sweep and tracking input never costs a traceback, a hang or a half-written folder (issue 14,
the sweep side), and runs a dead driver left RUNNING are marked interrupted at the next contact.

Every bad-input case runs the command in-process (``rayprune.cli.main``, no Ray is started) and
asserts exit code 2, exactly one stderr line ``rayprune: error: ...`` naming the problem, and
that the folder is as it was: no ``mlflow.db``, no results folder, no ``mlartifacts``, and a
given database file byte for byte unchanged.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import ray
import yaml

from rayprune.cli import main
from rayprune.testing.bad_input import refused as refuse


def refused(capsys, root: Path, argv: list[str], *needles: str) -> str:
    """:func:`rayprune.testing.bad_input.refused`, and Ray never started."""
    line = refuse(capsys, root, argv, *needles)
    assert not ray.is_initialized(), argv  # refused before Ray started
    return line


@pytest.fixture
def space(tmp_path, monkeypatch):
    """A valid one-cell sweep file in ``tmp_path`` (tracking and storage there), run from there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # (no module's Ray runs here: conftest)

    def write(**overrides) -> Path:
        raw = {
            "name": "mini",
            "dataset": {"name": "synthetic"},
            "model": "cifar_resnet:tiny",
            "shortcut": "avgpool_conv",
            "methods": [{"name": "random", "hparams": {"samples": 2}}],
            "grid": {"flops_targets": [0.5], "kd_weights": [0.0]},
            "optuna": {"samples_per_cell": 1, "seed": 3, "stage_prune": [[0.3, 0.8]] * 3},
            "resources": {"cpu": 1},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "mini"},
            "storage_path": str(tmp_path / "results"),
            **overrides,
        }
        path = tmp_path / "mini.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


# ---------------------------------------------------------------------------------------------
# A: the tracking store and the storage path, before Ray starts
# ---------------------------------------------------------------------------------------------


def test_a_tracking_file_that_is_not_a_database_is_one_line_before_ray(space, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    line = refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--mlflow-uri", f"sqlite:///{notes}"],
        f"{notes} is not an SQLite database",
        "--mlflow-uri",
    )
    assert line.startswith(f"rayprune: error: {notes} is not an SQLite database (tracking URI sqlite:///{notes}); ")


def test_a_tracking_database_of_another_program_is_not_written_into(space, tmp_path, capsys):
    other = tmp_path / "inventory.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE items (name TEXT)")
    refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--mlflow-uri", f"sqlite:///{other}"],
        f"the SQLite database {other} holds other tables (items), not MLflow's",
    )


def test_a_storage_path_that_is_a_file_is_one_line_and_leaves_no_database(space, tmp_path, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("x")
    refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--storage-path", str(blocker)],
        f"storage path {blocker} (storage_path / --storage-path) is a regular file, not a directory",
    )
    refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--storage-path", str(blocker / "sub")],
        f"{blocker} is a regular file, so the folder cannot be created",
    )
    refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--storage-path", str(blocker), "--resume"],
        "is a regular file",
    )  # not "no sweep to resume"


@pytest.mark.slow  # pyarrow's S3 client retries the dead endpoint for seconds
def test_object_storage_that_cannot_work_is_one_line_before_ray(space, tmp_path, capsys, monkeypatch):
    """An S3 endpoint nothing listens on, and a URI scheme pyarrow does not know. (A missing
    bucket on a live S3 server is checked beside the moto server, in test_cluster_sweep.)"""
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    line = refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--storage-path", "s3://sweeps/results"],
        "storage path s3://sweeps/results (storage_path / --storage-path): cannot reach it (",
        "AWS_ENDPOINT_URL_S3",
    )
    assert time.monotonic() - start < 60  # pyarrow's few retries, not minutes
    assert line.endswith(
        "; check the bucket name and the credentials (for S3: AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 for an S3-compatible "
        "server; for GCS: GOOGLE_APPLICATION_CREDENTIALS)"
    )
    line = refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--storage-path", "s4://sweeps/results"],
        "storage path s4://sweeps/results (storage_path / --storage-path): ",
    )
    assert line.endswith("; use a local folder or an s3://BUCKET/PREFIX or gs://BUCKET/PREFIX URI")


def test_a_trial_needing_more_gpus_or_cpus_than_the_machine_has_is_refused_before_ray(space, tmp_path, capsys):
    line = refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space(resources={"cpu": 1, "gpu": 64}))],
        "resources.gpu: each trial asks for 64 GPUs but this machine has ",
    )
    assert line.endswith("; lower resources.gpu or join a cluster with --address auto")
    refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space(resources={"cpu": 2})), "--num-cpus", "1"],
        "resources.cpu: each trial asks for 2 CPUs but this machine has 1 (--num-cpus)",
    )


# ---------------------------------------------------------------------------------------------
# E: a Ray address nothing listens on fails in seconds, not minutes
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nothing_listens_on_fails_within_seconds(space, tmp_path, capsys):
    start = time.monotonic()
    line = refused(capsys, tmp_path, ["sweep", "--space", str(space()), "--address", "127.0.0.1:9"])
    assert time.monotonic() - start < 30  # imports included; the probe itself waits at most 3 s
    assert line.startswith(
        "rayprune: error: cannot join the Ray cluster at 127.0.0.1:9: nothing accepted a connection within 3 s ("
    )
    assert line.endswith(
        "; start it with `ray start --head` or check the address (or drop --address to run on a local Ray)"
    )


def test_address_auto_reads_ray_address_and_says_when_there_is_no_cluster(space, tmp_path, capsys, monkeypatch):
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what `auto` resolves to, as in ray.init
    refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--address", "auto"],
        f"cannot join the Ray cluster at 127.0.0.1:{port} (--address auto)",
    )

    from ray._private import services

    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])  # no Ray process on this machine ...
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)  # ... and no `ray start`
    refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--address", "auto"],
        "--address auto: no running Ray cluster found on this machine",
        "ray start --head",
    )


def test_an_address_that_is_not_host_port_is_one_line(space, tmp_path, capsys):
    refused(
        capsys,
        tmp_path,
        ["sweep", "--space", str(space()), "--address", "headnode"],
        "--address headnode: expected HOST:PORT (e.g. 10.0.0.5:6379) or auto",
    )


# ---------------------------------------------------------------------------------------------
# G: front and pick --no-register never create MLflow's schema
# ---------------------------------------------------------------------------------------------

LOOKUP = ["--experiment", "mini"]


@pytest.mark.parametrize("command", [["front"], ["pick", "--mode", "efficient", "--no-register", "--out", "exp"]])
def test_an_empty_database_file_stays_empty(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow.db").touch()  # e.g. left by `touch` or a crashed tool
    line = refused(
        capsys,
        tmp_path,
        [*command, *LOOKUP],
        f"the MLflow database {tmp_path}/mlflow.db is empty (0 bytes), so no sweep was logged there",
    )
    assert "--mlflow-uri" in line
    assert (tmp_path / "mlflow.db").stat().st_size == 0 and not (tmp_path / "exp").exists()


def test_front_on_a_missing_or_foreign_database_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, ["front", *LOOKUP], f"no MLflow database at {tmp_path}/mlflow.db")
    with sqlite3.connect(tmp_path / "other.db"):
        pass  # an SQLite file without tables (0 bytes until written)
    with sqlite3.connect(tmp_path / "inventory.db") as db:
        db.execute("CREATE TABLE items (name TEXT)")
    refused(
        capsys,
        tmp_path,
        ["front", *LOOKUP, "--mlflow-uri", f"sqlite:///{tmp_path}/inventory.db"],
        f"the SQLite database {tmp_path}/inventory.db holds other tables (items), not MLflow's",
    )
    (tmp_path / "text.db").write_text("hello")
    refused(
        capsys,
        tmp_path,
        [
            "pick",
            *LOOKUP,
            "--mlflow-uri",
            f"sqlite:///{tmp_path}/text.db",
            "--mode",
            "robust",
            "--no-register",
            "--out",
            str(tmp_path / "exp"),
        ],
        f"{tmp_path}/text.db is not an SQLite database",
    )


@pytest.mark.slow  # a process killed mid-write, and MLflow's store
def test_a_database_a_killed_driver_left_mid_write_is_read_once_sqlite_rolls_it_back(tmp_path):
    """A driver SIGKILLed inside a transaction leaves a hot journal beside the database. The next
    reader (`front`, `pick`) must get the last committed state, as SQLite recovers it; a
    read-only first look failed instead ("attempt to write a readonly database", seen in the
    SIGKILL test)."""
    from mlflow import MlflowClient

    from rayprune.tracking import lookup

    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_experiment("mini")
    killed_mid_write = (
        "import os, signal, sqlite3\n"
        f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "db.execute('PRAGMA cache_size=1')\n"  # pages spill to the file: the journal is hot
        "db.execute('BEGIN')\n"
        "db.execute('CREATE TABLE scratch (x TEXT)')\n"
        "db.executemany('INSERT INTO scratch VALUES (?)', [('x' * 500,)] * 2000)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    died = subprocess.run([sys.executable, "-c", killed_mid_write])
    assert died.returncode == -signal.SIGKILL and (tmp_path / "mlflow.db-journal").is_file()
    client = lookup.connect(f"sqlite:///{db}", must_exist=True)
    assert client.get_experiment_by_name("mini") is not None
    assert not (tmp_path / "mlflow.db-journal").exists()
    with closing(sqlite3.connect(db)) as conn:
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name = 'scratch'").fetchall()


def test_a_database_a_starting_driver_is_migrating_is_waited_for_then_one_line(tmp_path, capsys, monkeypatch):
    """Opening a SQLite store migrates it; a driver creating the same file at that moment makes
    MLflow's client raise sqlalchemy's OperationalError (seen in a test that read the database
    while a sweep started). The reader waits for the driver, and past the wait says so."""
    import sqlite3 as sqlite

    from mlflow import MlflowClient
    from sqlalchemy.exc import OperationalError

    from rayprune.tracking import lookup

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("mini")
    collision = OperationalError(
        "CREATE TABLE _alembic_tmp_experiments",
        {},
        sqlite.OperationalError("table _alembic_tmp_experiments already exists"),
    )
    calls = []

    def busy_twice(*args, **kwargs):
        calls.append(args)
        if len(calls) <= 2:
            raise collision
        return MlflowClient(*args, **kwargs)

    monkeypatch.setattr(lookup, "MlflowClient", busy_twice)
    assert lookup.find_experiment(lookup.connect(uri, must_exist=True), "mini") and len(calls) == 3  # waited

    def always_busy(*args, **kwargs):
        raise collision

    monkeypatch.setattr(lookup, "MlflowClient", always_busy)
    monkeypatch.setattr(lookup, "BUSY_WAIT_S", 0.2)
    capsys.readouterr()  # MLflow's log lines from creating the database above
    line = refused(capsys, tmp_path, ["front", *LOOKUP, "--mlflow-uri", uri])
    assert line == (
        f"rayprune: error: the MLflow database {tmp_path}/mlflow.db stayed busy for 0.2 s (table "
        "_alembic_tmp_experiments already exists): another process is creating or writing it; try "
        "again when it is done"
    )


# ---------------------------------------------------------------------------------------------
# Runs a SIGKILLed driver left RUNNING are marked interrupted at the next contact
# ---------------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow  # several tracker sessions on one store
def test_runs_of_a_dead_driver_are_marked_interrupted_at_the_next_contact(tmp_path, capsys):
    from mlflow.entities import RunTag

    from rayprune import models
    from rayprune.methods.base import SubnetRecord
    from rayprune.tracking import liveness
    from rayprune.tracking.mlflow_tracker import SweepTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "exp", tmp_path / "work")
    parent = tracker.start_sweep("mini-1", {"seed": 0}, {liveness.SPACE_TAG: "search_spaces/mini.yaml"})
    client = tracker.client
    tags = client.get_run(parent).data.tags
    assert tags[liveness.STATUS_TAG] == "running" and tags[liveness.DRIVER_TAG].endswith(
        f":{__import__('os').getpid()}"
    )
    tracker.log_unpruned(
        SubnetRecord.of(models.full_spec("cifar_resnet:tiny"), {"test_top1": 0.9}, "unpruned", 0).to_dict()
    )
    trial = tracker.trial_started("t1", {"method": "uniform", "flops_target": 0.5, "kd_weight": 0.0})
    tracker.update_front()
    # The driver is SIGKILLed: nothing closes its runs; its process is gone.
    tracker.liveness.heartbeat.stop()
    client.log_batch(parent, tags=[RunTag(liveness.DRIVER_TAG, f"{socket.gethostname()}:{dead_pid()}")])
    assert client.get_run(parent).info.status == "RUNNING" and client.get_run(trial).info.status == "RUNNING"

    # `front` never writes: it shows the fronts and says, in one stderr line, what happened.
    capsys.readouterr()
    assert main(["front", "--experiment", "exp", "--mlflow-uri", uri]) == 0
    captured = capsys.readouterr()
    assert "unpruned baseline" in captured.out
    assert captured.err == (
        "rayprune: note: sweep mini-1 was interrupted (its driver "
        f"{client.get_run(parent).data.tags[liveness.DRIVER_TAG]} stopped without closing its "
        "runs); its fronts are partial; resume it with: rayprune sweep --space "
        "search_spaces/mini.yaml --resume mini-1\n"
    )
    assert client.get_run(parent).info.status == "RUNNING"

    # The next driver in the experiment (a new sweep, a resume) closes them as interrupted.
    other = SweepTracker(uri, "exp", tmp_path / "work2")
    other.start_sweep("mini-2", {"seed": 0})
    run = client.get_run(parent)
    assert run.info.status == "KILLED" and run.data.tags[liveness.STATUS_TAG] == "interrupted"
    assert run.data.tags[liveness.NOTE_TAG].endswith(
        "resume with: rayprune sweep --space search_spaces/mini.yaml --resume mini-1"
    )
    assert client.get_run(trial).info.status == "KILLED"
    assert client.get_run(trial).data.tags[liveness.STATUS_TAG] == "interrupted"
    # ... and a live driver's runs (mini-2: this process) are left alone.
    assert liveness.interrupted_sweeps(client, other.experiment_id, mark=True) == []
    assert client.get_run(other.parent_run_id).info.status == "RUNNING"
    other.finish()
    assert client.get_run(other.parent_run_id).data.tags[liveness.STATUS_TAG] == "finished"

    # --resume reopens the parent as before, and the interrupted note goes.
    again = SweepTracker(uri, "exp", tmp_path / "work")
    assert again.start_sweep("mini-1", {"seed": 0}) == parent
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.tags[liveness.STATUS_TAG] == "running"
    assert liveness.NOTE_TAG not in run.data.tags
    again.trial_started("t1", {"method": "uniform", "flops_target": 0.5, "kd_weight": 0.0})
    assert client.get_run(trial).info.status == "RUNNING"
    assert liveness.STATUS_TAG not in client.get_run(trial).data.tags
    again.fail("KILLED")  # Ctrl-C: the driver marks it itself
    run = client.get_run(parent)
    assert run.info.status == "KILLED" and run.data.tags[liveness.STATUS_TAG] == "interrupted"


def test_a_driver_on_another_host_is_dead_only_when_its_heartbeat_is_stale():
    from rayprune.tracking.liveness import DRIVER_TAG, HEARTBEAT_TAG, STALE_AFTER_S, driver_is_dead

    now = 1_000_000.0
    other = {DRIVER_TAG: "some-other-host:1234"}
    assert not driver_is_dead({**other, HEARTBEAT_TAG: str(now - 60)}, now)
    assert driver_is_dead({**other, HEARTBEAT_TAG: str(now - STALE_AFTER_S - 1)}, now)
    assert not driver_is_dead({}, now)  # a run logged before drivers were recorded: never judged
    me = {DRIVER_TAG: f"{socket.gethostname()}:{__import__('os').getpid()}", HEARTBEAT_TAG: str(now)}
    assert not driver_is_dead(me, now)
    assert driver_is_dead({**me, DRIVER_TAG: f"{socket.gethostname()}:{dead_pid()}"}, now)


def test_the_heartbeat_refreshes_the_parent_run_until_stopped(tmp_path):
    from mlflow import MlflowClient

    from rayprune.tracking.liveness import HEARTBEAT_TAG, Heartbeat

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("beat")).info.run_id
    client.set_tag(run_id, HEARTBEAT_TAG, "0")
    before = time.time()
    beat = Heartbeat(uri, run_id, every_s=0.05)

    def tag() -> str:
        return client.get_run(run_id).data.tags[HEARTBEAT_TAG]

    deadline = time.monotonic() + 120
    while tag() == "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(before) <= int(tag()) <= time.time()  # refreshed, with the current Unix time
    beat.stop()
    assert not beat._thread.is_alive()
    client.set_tag(run_id, HEARTBEAT_TAG, "1")
    time.sleep(0.3)  # six periods
    assert tag() == "1"  # stopped: nothing refreshes it any more


@pytest.mark.slow  # a tracked sweep's publishing over time
def test_a_running_sweep_publishes_its_fronts_at_the_first_finished_trial_then_at_most_every_interval(tmp_path):
    from rayprune import models
    from rayprune.methods.base import SubnetRecord
    from rayprune.tracking.lookup import SUBNETS_ARTIFACT
    from rayprune.tracking.mlflow_tracker import SweepTracker

    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path / "work")
    parent = tracker.start_sweep("mini-1", {"seed": 0})

    def published() -> bool:
        return SUBNETS_ARTIFACT in {f.path for f in tracker.client.list_artifacts(parent)}

    def plotted() -> bool:
        return "pareto/pareto.png" in {f.path for f in tracker.client.list_artifacts(parent, "pareto")}

    tracker.log_unpruned(
        SubnetRecord.of(models.full_spec("cifar_resnet:tiny"), {"test_top1": 0.9}, "unpruned", 0).to_dict()
    )
    assert not published()
    assert tracker.publish_if_due(every_s=3600) and published()  # the first time: at once ...
    assert not plotted()  # ... without the plot, within the interval from the start
    assert not tracker.publish_if_due(every_s=3600)  # then not again within the interval ...
    assert tracker.publish_if_due(every_s=0) and plotted()  # ... and again once it has passed, plot too
    tracker.finish()


def test_tunes_warning_about_trials_that_had_not_reported_is_filtered_on_resume():
    import logging

    from rayprune.orchestration import sweep

    sweep._quiet_env()  # what run_sweep does first
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:  # the message as Ray 2.60's ExperimentAnalysis words it
        missing = FileNotFoundError(
            "Could not fetch metrics for random_f0.5_kd0_1: both result.json and "
            "progress.csv were not found at /results/mini-1/random_f0.5_kd0_1"
        )
        log.warning(f"Failed to fetch metrics for 1 trial(s):\n- random_f0.5_kd0_1: {missing!r}")
        log.warning("Failed to fetch metrics for 1 trial(s):\n- random_f0.5_kd0_2: OSError('Input/output error')")
    finally:
        log.removeHandler(handler)
    assert seen == ["Failed to fetch metrics for 1 trial(s):\n- random_f0.5_kd0_2: OSError('Input/output error')"]
