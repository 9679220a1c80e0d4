"""The sweep on a multi-node Ray cluster, on one machine (issue 15), in as few sweeps as possible:

* a head (no CPUs, like cluster.yaml's) and two worker nodes of one CPU each
  (``ray.cluster_utils.Cluster``), shared by the tests of this module;
* an S3 API on loopback (moto's server) that pyarrow (Tune, the driver, the trials) and boto3
  (the MLflow server's artifact proxy) reach through ``AWS_ENDPOINT_URL_S3``;
* a real ``mlflow server`` started and restarted by launch/cluster.yaml's own head commands
  (SQLite backend, artifacts proxied to that S3, bound to 127.0.0.1).

One sweep through S3 and the server during which a worker node is removed: trials ran on both
workers, the lost node's trial continued from its last checkpoint on the survivor, MLflow and the
parquet hold what the trials reported, once each, and the moved trial's records equal those of the
same trial run undisturbed (in the test process, by the trainable's own parts). Then ``--resume``
through S3, ``front`` and ``pick`` against the server.
Fractional-GPU trials: test_gpu_share.py.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray import tune
from sweep_checks import EXPORTED_FILES, check_tracking, pick_efficient, trial_results, undisturbed_trial

from rayprune import models
from rayprune.orchestration.config import parse_sweep
from rayprune.orchestration.search import FINAL_KEY
from rayprune.orchestration.storage import filesystem
from rayprune.orchestration.sweep import run_sweep
from rayprune.testing.sweeps import mini_sweep

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "rayprune-test"
LATENCY = "latency"  # measured time: differs between any two runs, so never compared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what}: not seen within {timeout:g} s")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a killed process that nobody has reaped yet (a zombie) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def group_commands(pgid: int) -> list[str]:
    """The command lines of the live processes in process group ``pgid``."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == pgid:
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return out


# --------------------------------------------------------------------------------------------
# Services: S3 API, MLflow server (cluster.yaml's commands), a 3-node Ray cluster
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback with one bucket; the AWS variables every process inherits
    (set before Ray starts, so raylets and workers have them)."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/moto-api/"), "moto_server")
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def head_mlflow_commands(port: int, gcs_port: int) -> list[str]:
    """cluster.yaml's head start commands that stop, describe and start the MLflow server, with
    the test's ports (the server's; the GCS port its watcher polls) and bucket, and one server
    worker process instead of MLflow's default 4 (each imports MLflow: CPU seconds on 2 cores)."""
    head = yaml.safe_load((ROOT / "launch" / "cluster.yaml").read_text())["head_start_ray_commands"]
    commands = [c for c in head if "mlflow" in c]
    assert len(commands) == 3 and "kill -TERM" in commands[0] and "mlflow server" in commands[2]
    mapping = {
        "5000": str(port),
        "/6379": f"/{gcs_port}",
        "s3://YOUR-BUCKET/": f"s3://{BUCKET}/",
        "mlflow server ": "mlflow server --workers 1 ",
    }
    for old, new in mapping.items():
        commands = [c.replace(old, new) for c in commands]
    return commands


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory, migrated_mlflow_store):
    """The head's MLflow server, started as `ray up` starts it (a second `ray up` stopping the
    first server: test_cluster_path, with a stand-in server)."""
    home = tmp_path_factory.mktemp("head-home")
    port, gcs_port = free_port(), free_port()
    gcs = socket.create_server(("127.0.0.1", gcs_port))  # the head's Ray, for the server's watcher
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    commands = head_mlflow_commands(port, gcs_port)
    pidfile = home / ".rayprune" / "mlflow_server.pid"

    def up() -> int:
        for command in commands:
            subprocess.run(
                ["bash", "-c", command],
                env=env,
                check=True,
                timeout=420,  # the start command itself waits up to 300 s for the server
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), "mlflow server", timeout=300)
        return int(pidfile.read_text())

    migrated_mlflow_store(home / "mlflow.db")  # as a later `ray up` finds it: no migrations in the server
    server = up()
    try:
        assert alive(server)
        record = json.loads((home / ".rayprune" / "mlflow_server.json").read_text())
        assert record == {
            "uri": f"http://127.0.0.1:{port}",
            "backend_store_uri": f"sqlite:///{home}/mlflow.db",
            "storage_path": f"s3://{BUCKET}/rayprune/ray_results",
        }
        yield f"http://127.0.0.1:{port}", home
        # After the sweeps: MLflow's job runner never started in the server's group (it is off).
        assert not [c for c in group_commands(server) if "jobs._job_runner" in c or "huey" in c]
    finally:
        # The stop command alone, with a 2 s grace before its SIGKILL instead of 30 (the grace
        # itself: test_cluster_path, with a stand-in server that ignores SIGTERM).
        subprocess.run(["bash", "-c", commands[0].replace("seq 30", "seq 2")], env=env, timeout=60)
        gcs.close()
    # The stop command ends with SIGKILL; its delivery is asynchronous, so wait for it (bounded).
    wait_for(lambda: not alive(server), "the stopped server's exit", timeout=60)
    assert not pidfile.exists() and not answers(f"http://127.0.0.1:{port}/health")


class Nodes:
    """The test cluster and its worker nodes, found by the node-removing callback (callbacks are
    pickled with the experiment, so they hold only a name), and the worker it removed."""

    cluster = None
    workers: ClassVar[list] = []
    lost = None


@pytest.fixture(scope="module")
def cluster(s3):
    from ray.cluster_utils import Cluster

    # Node death noticed within seconds, not the default half minute.
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system}
    )
    Nodes.cluster = c
    Nodes.workers = [c.add_node(num_cpus=1, resources={"worker": 1}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


# --------------------------------------------------------------------------------------------
# Reading back what a sweep did
# --------------------------------------------------------------------------------------------


def mini(tmp_path: Path, **overrides) -> dict:
    """:func:`~rayprune.testing.sweeps.mini_sweep` with the random sampler: its suggestions do not
    depend on the order trials complete in, so a disturbed sweep can equal an undisturbed one."""
    optuna = {"sampler": "random", "samples_per_cell": 1, "seed": 3, "stage_prune": [[0.3, 0.8]] * 3}
    # trials at once on both worker nodes, so that one runs on the node that is lost
    return mini_sweep(tmp_path, **{"optuna": optuna, "max_concurrent_trials": None, **overrides})


def without_latency(metrics: dict) -> dict:
    """A record's metrics but its measured latency (it differs between any two runs)."""
    return {k: v for k, v in metrics.items() if LATENCY not in k}


def comparable_rows(rows: list[dict]) -> list[tuple]:
    """Subnet rows without what differs between two equal sweeps (ids, measured latency)."""
    return sorted(
        (
            r["kind"],
            r["flops_target"],
            r["kd_weight"],
            r["step"],
            r["spec_hash"],
            r["macs"],
            r["params"],
            r["recipe"],
            r["init"],
            json.dumps({k: v for k, v in r["metrics"].items() if LATENCY not in k}, sort_keys=True),
        )
        for r in rows
    )


def comparable_runs(uri: str, experiment: str) -> list[tuple]:
    """Every run of the experiment by role and name (trial ids stripped), with its params and its
    metrics (latency left out) and each metric's step history."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    out = []
    for run in client.search_runs([experiment_id]):
        role = run.data.tags.get("rayprune.role")
        name = {"trial": run.info.run_name.rsplit("_", 1)[0], "sweep": "sweep"}.get(role, run.info.run_name)
        params = {k: v for k, v in run.data.params.items() if role != "sweep" and k not in ("trial_id",)}
        metrics = {k: v for k, v in run.data.metrics.items() if LATENCY not in k and not k.startswith("time")}
        history = [m.step for m in client.get_metric_history(run.info.run_id, "steps_done")]
        out.append(
            (
                role,
                name,
                run.info.status,
                json.dumps(params, sort_keys=True),
                json.dumps(metrics, sort_keys=True),
                tuple(sorted(history)),
            )
        )
    return sorted(out)


class RemoveWorkerOnce(tune.Callback):
    """Removes (kills) the worker node of the first trial whose first checkpoint is registered,
    while it goes on with its second step. Whichever node that is: where Tune puts a trial is
    Ray's choice (with actor reuse, every trial may run on one node on a loaded machine)."""

    def __init__(self) -> None:
        self.done = False

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        node = (trial.last_result or {}).get("node_id")
        victims = [n for n in Nodes.workers if n.node_id == node]
        if not self.done and victims:
            self.done = True
            Nodes.lost = victims[0]
            Nodes.cluster.remove_node(Nodes.lost, allow_graceful=False)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_a_sweep_survives_losing_a_node_through_s3_and_an_mlflow_server(
    cluster, s3, mlflow_server, tmp_path, monkeypatch, capsys
):
    from rayprune.cli import main
    from rayprune.tracking.lookup import connect, find_experiment, find_sweep_run, sweep_rows

    monkeypatch.setenv("RAYPRUNE_SWEEP_DIR", str(tmp_path / "driver"))  # the driver's files of an S3 sweep
    server, _ = mlflow_server

    # A sweep through S3 and the server; a worker node dies mid-sweep.
    cfg = parse_sweep(
        mini(
            tmp_path,
            tracking={"uri": server, "experiment": "mini"},
            storage_path=f"s3://{BUCKET}/results",
            max_failures=2,
            grid={"flops_targets": [0.5], "kd_weights": [0.0, 0.9]},  # two trials, at once where Ray spreads them
        )
    )
    out = io.StringIO()
    remover = RemoveWorkerOnce()
    outcome = run_sweep(cfg, address=cluster.address, callbacks=[remover], out=out)
    assert outcome.complete and not outcome.failed_trials and outcome.num_trials == 2
    assert outcome.experiment_path == f"s3://{BUCKET}/results/{outcome.sweep_id}"
    assert len(ray.nodes()) == 3 and sum(n["Alive"] for n in ray.nodes()) == 2  # the head and one worker

    # The lost node's trial continued from its checkpoint on the other worker.
    results = trial_results(outcome.experiment_path)
    (survivor,) = [n for n in Nodes.workers if n is not Nodes.lost]
    (moved,) = [rs for rs in results.values() if len({r["node_id"] for r in rs}) == 2]
    assert moved[0]["node_id"] == Nodes.lost.node_id and moved[-1]["node_id"] == survivor.node_id
    # The first result on the surviving node follows a restore from the last checkpoint the lost
    # node wrote. Where the node died is a race (after step 1's checkpoint, after step 2's, or
    # even after the final report but before Tune closed the trial), so the test asserts what
    # holds in every case: the surviving node continued (no step lost) from the lost node's last
    # checkpoint (no step started afresh), and the trial ended with exactly one final report there.
    first = next(i for i, r in enumerate(moved) if r["node_id"] == survivor.node_id)
    assert first >= 1 and moved[first]["iterations_since_restore"] == 1  # restored, not started afresh
    lost, survived = moved[:first], moved[first:]
    assert [r["steps_done"] for r in lost] in ([1], [1, 2], [1, 2, 2])
    restored_from = lost[-1]["steps_done"]
    assert survived[0]["steps_done"] in (restored_from, restored_from + 1)  # from the last checkpoint, or re-run
    assert [r["steps_done"] for r in survived][-1] == 2 and [r[FINAL_KEY] for r in survived].count(True) == 1
    assert all(a["steps_done"] <= b["steps_done"] for a, b in itertools.pairwise(moved))  # never went backwards
    assert all([r["steps_done"] for r in rs] == [1, 2, 2] for rs in results.values() if rs is not moved)
    # Teacher, checkpoints and the final-phase cache live on S3.
    fs, root = filesystem(outcome.experiment_path)
    assert fs.get_file_info(f"{root}/teacher/weights.pt").size > 0
    import pyarrow.fs

    files = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))]
    final_checkpoints = [p for p in files if p.endswith("/final/weights.pt") and "/checkpoint_" in p]
    assert (
        len({p.split("/checkpoint_")[0] for p in final_checkpoints}) == 2
    )  # every trial's (the moved one's may be twice)
    assert sum(p.startswith(f"{root}/final_cache/") and p.endswith("/metrics.json") for p in files) >= 3

    # The records: the parquet (as uploaded to the parent run, through the server's artifact
    # proxy to S3) and MLflow hold what the trials reported, once each (one metric point per
    # step: none lost or repeated by the restore) ...
    client = connect(server)
    parent = find_sweep_run(client, find_experiment(client, "mini"), outcome.sweep_id)
    rows = sweep_rows(client, parent)
    check_tracking(cfg, outcome.experiment_path, cells=[(0.5, 0.0), (0.5, 0.9)], rows=rows)
    # ... and the moved trial's are those of the same trial undisturbed (its config run here).
    searched, final = undisturbed_trial(moved[0]["config"], tmp_path / "undisturbed")
    trial = moved[0]["trial_id"]
    assert (
        searched
        and {(r["step"], r["spec_hash"]) for r in rows if r["kind"] == "search" and r["trial_id"] == trial} == searched
    )
    (final_row,) = [r for r in rows if r["kind"] == "final" and r["trial_id"] == trial]
    assert final_row["spec_hash"] == models.spec_hash(final.spec)
    assert without_latency(final_row["metrics"]) == without_latency(final.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"subnets.parquet", "pareto", "sweep"}
    # The server stores artifacts in the bucket, not on the head's disk.
    stored = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/rayprune/mlflow", recursive=True))
    assert any(i.path.endswith("/subnet/weights.pt") for i in stored)

    # The printed hint names the server and the port forward, not `mlflow ui`.
    text = out.getvalue()
    assert f"Browse the runs: the MLflow server at {server}" in text and "mlflow ui" not in text
    assert f"ray attach launch/cluster.yaml -p {server.rsplit(':', 1)[1]}" in text

    # --resume through S3: found by listing the bucket, nothing run or logged twice.
    runs = comparable_runs(server, "mini")
    again = run_sweep(cfg, address=cluster.address, resume="latest", out=io.StringIO())
    assert again.complete and (again.sweep_id, again.parent_run_id) == (outcome.sweep_id, outcome.parent_run_id)
    assert comparable_rows(
        sweep_rows(client, find_sweep_run(client, parent.info.experiment_id, outcome.sweep_id))
    ) == comparable_rows(rows)
    assert comparable_runs(server, "mini") == runs

    # front and pick against the server (the subnet's weights come back through the proxy).
    capsys.readouterr()
    assert main(["front", "--experiment", "mini", "--mlflow-uri", server]) == 0
    assert "final front [kd0]" in capsys.readouterr().out
    assert pick_efficient("mini", server, tmp_path / "eff") == EXPORTED_FILES
    assert client.get_model_version_by_alias("rayprune-mini", "efficient").version == "1"  # registered on the server


def test_a_missing_bucket_is_refused_before_ray_and_an_existing_one_passes(s3):
    """The storage preflight against a live S3 server (an unreachable one: test_bad_input_sweep)."""
    from rayprune.orchestration.preflight import PreflightError, check_object_storage

    check_object_storage(f"s3://{BUCKET}/results")  # exists and answers: no error
    with pytest.raises(
        PreflightError,
        match=r"^storage path s3://no-such-bucket/results \(storage_path / "
        r"--storage-path\): bucket 'no-such-bucket' does not exist \(rayprune "
        r"does not create buckets\); create it or check the bucket name",
    ):
        check_object_storage("s3://no-such-bucket/results")
