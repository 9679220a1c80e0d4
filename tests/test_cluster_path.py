"""The cluster path without traps (issue 27): `ray up` returns when the head's MLflow server
answers and `ray stop` (so `ray down`) ends it; a joined driver gives a server that is still
starting a bounded wait and then names the cluster's server; a driver in a Ray job's temporary
package folder keeps nothing there; every node runs Ray with token authentication, and a client
without the token cannot use a head started the way cluster.yaml starts it."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from rayprune.orchestration import cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "launch" / "cluster.yaml"
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> socket.socket:
    """A socket that accepts connections on ``port`` (a server's or Ray GCS's port, for probes)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    return s


def cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def write_head_record(home: Path, uri: str, storage_path: str | None = None) -> None:
    """What cluster.yaml's head start commands record about the head's MLflow server."""
    record = {"uri": uri, "backend_store_uri": f"sqlite:///{home}/mlflow.db"}
    if storage_path is not None:
        record["storage_path"] = storage_path
    (home / ".rayprune").mkdir(parents=True, exist_ok=True)
    (home / ".rayprune" / "mlflow_server.json").write_text(json.dumps(record) + "\n")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """This machine's home, where cluster.yaml keeps the head server's record (absent until written)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv(cluster.HEAD_MLFLOW_ENV, str(home / ".rayprune" / "mlflow_server.json"))
    return home


@pytest.fixture
def sweeps(monkeypatch):
    """The configs ``rayprune sweep`` hands to the driver (which does nothing here)."""
    from rayprune.orchestration import sweep

    seen: list = []

    def fake_run_sweep(cfg, **kwargs):
        seen.append(cfg)
        return sweep.SweepOutcome("quickstart-1", cfg.storage_path, "run", fake_run_sweep.complete, cfg.num_trials())

    fake_run_sweep.complete = True
    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    return seen, fake_run_sweep


def sweep(*args: str) -> int:
    from rayprune.cli import main

    return main(["sweep", *args])


# --------------------------------------------------------------------------------------------
# A joined driver and a tracking server that is still starting
# --------------------------------------------------------------------------------------------


def test_a_joined_driver_waits_for_a_server_that_starts_late(home, sweeps, capsys):
    seen, _ = sweeps
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    write_head_record(home, uri)
    opened: list[socket.socket] = []
    opener = threading.Timer(1.5, lambda: opened.append(listening(port)))
    opener.start()
    start = time.monotonic()
    try:
        assert sweep("--space", str(QUICKSTART), "--address", "auto", "--mlflow-uri", uri) == 0
        waited = time.monotonic() - start
    finally:
        opener.join()
        for s in opened:
            s.close()
    assert 1.4 <= waited < 10
    assert capsys.readouterr().err == (
        f"rayprune: the MLflow server at {uri} refuses connections (it may still be starting); waiting up to 30 s\n"
    )
    assert [cfg.tracking.uri for cfg in seen] == [uri]


def test_a_server_that_never_answers_ends_in_one_line_naming_the_clusters_server(home, sweeps, capsys, monkeypatch):
    seen, _ = sweeps
    uri = f"http://127.0.0.1:{free_port()}"
    write_head_record(home, uri)
    monkeypatch.setenv(cluster.SERVER_WAIT_ENV, "1")
    start = time.monotonic()
    assert sweep("--space", str(QUICKSTART), "--address", "auto", "--mlflow-uri", uri) == 2
    assert time.monotonic() - start >= 1
    assert capsys.readouterr().err.splitlines() == [
        f"rayprune: the MLflow server at {uri} refuses connections (it may still be starting); waiting up to 1 s",
        f"rayprune: error: cannot reach the MLflow tracking server at {uri} (Connection refused) after waiting 1 s; "
        "it is the server `ray up` started on this cluster's head: look at its log with "
        "ray exec launch/cluster.yaml 'tail ~/mlflow.log' and restart it with "
        "`ray up launch/cluster.yaml --restart-only`, or pass a reachable --mlflow-uri",
    ]
    assert not seen
    # another server than the head's, or no record: the line still names the cluster's server
    (home / ".rayprune" / "mlflow_server.json").unlink()
    with pytest.raises(cluster.LaunchError, match=r"launch/cluster.yaml starts the cluster's server on the head, at"):
        cluster.wait_for_tracking_server(uri, "auto", wait_s=0)
    write_head_record(home, "http://127.0.0.1:5000")
    with pytest.raises(cluster.LaunchError, match=r"this cluster's head runs its server at http://127.0.0.1:5000: "):
        cluster.wait_for_tracking_server(uri, "auto", wait_s=0)


def test_a_local_driver_does_not_wait():
    start = time.monotonic()
    cluster.wait_for_tracking_server(f"http://127.0.0.1:{free_port()}", None)  # the sweep's own check says it
    cluster.wait_for_tracking_server("sqlite:///mlflow.db", "auto")
    assert time.monotonic() - start < 1


# --------------------------------------------------------------------------------------------
# A driver in a Ray job's temporary package folder
# --------------------------------------------------------------------------------------------


@pytest.fixture
def package_folder(tmp_path, home, monkeypatch):
    """The copy of `--working-dir` that `ray job submit` runs the driver in."""
    folder = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (folder / "search_spaces").mkdir(parents=True)
    shutil.copy(QUICKSTART, folder / "search_spaces")  # tracking.uri sqlite:///mlflow.db, storage_path ray_results
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def server_port():
    port = free_port()
    with listening(port):
        yield port


def test_a_job_driver_logs_to_the_heads_server_and_stores_in_the_clusters_storage(
    package_folder, home, server_port, sweeps, capsys
):
    seen, driver = sweeps
    uri = f"http://127.0.0.1:{server_port}"
    write_head_record(home, uri, "s3://bucket/rayprune/ray_results")
    assert sweep("--space", "search_spaces/quickstart.yaml", "--address", "auto") == 0
    assert [(cfg.tracking.uri, cfg.storage_path) for cfg in seen] == [(uri, "s3://bucket/rayprune/ray_results")]
    assert capsys.readouterr().err == (
        f"rayprune: this sweep runs in Ray's temporary package folder {package_folder}, which Ray deletes with the "
        f"session: it logs to {uri} and stores its results in s3://bucket/rayprune/ray_results instead (pass "
        "--mlflow-uri / --storage-path to choose)\n"
    )
    # the resume command names the sweep file as the next job's working dir has it
    driver.complete = False
    assert sweep("--space", "search_spaces/quickstart.yaml", "--address", "auto") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "The sweep was interrupted; continue it with: rayprune sweep --space search_spaces/quickstart.yaml "
        "--resume quickstart-1"
    )
    assert sorted(p.name for p in package_folder.iterdir()) == ["search_spaces"]


def test_without_a_recorded_storage_path_a_job_driver_stores_in_the_heads_home(
    package_folder, home, server_port, sweeps, capsys
):
    seen, _ = sweeps
    write_head_record(home, f"http://127.0.0.1:{server_port}")
    assert sweep("--space", "search_spaces/quickstart.yaml", "--address", "auto") == 0
    assert [cfg.storage_path for cfg in seen] == [f"{home}/ray_results"]
    assert f"stores its results in {home}/ray_results instead" in capsys.readouterr().err


def test_a_job_driver_with_no_known_server_or_a_place_in_the_folder_is_refused_before_anything(
    package_folder, home, server_port, sweeps, capsys
):
    seen, _ = sweeps
    assert sweep("--space", "search_spaces/quickstart.yaml", "--address", "auto") == 2
    assert capsys.readouterr().err == (
        f"rayprune: error: this sweep runs in Ray's temporary package folder {package_folder} (ray job submit "
        "--working-dir), which Ray deletes with the session, and would keep its MLflow database and results there "
        "(no MLflow server of this cluster is recorded in ~/.rayprune/mlflow_server.json): pass --mlflow-uri (the "
        "head's server, http://127.0.0.1:5000, or sqlite:////abs/path/mlflow.db outside that folder) and "
        "--storage-path (s3://BUCKET/rayprune/ray_results or a shared folder)\n"
    )
    write_head_record(home, f"http://127.0.0.1:{server_port}")
    assert sweep("--space", "search_spaces/quickstart.yaml", "--address", "auto", "--storage-path", "results") == 2
    assert capsys.readouterr().err.startswith(  # given there: nothing is moved, so both stay named
        f"rayprune: error: this sweep runs in Ray's temporary package folder {package_folder} (ray job submit "
        "--working-dir), which Ray deletes with the session, and would keep its MLflow database and results "
        "there: pass --mlflow-uri"
    )
    db = f"sqlite:///{home}/mlflow.db"  # only the results there
    assert sweep("--space", "search_spaces/quickstart.yaml", "--mlflow-uri", db, "--storage-path", "results") == 2
    assert "and would keep its results there: pass --mlflow-uri" in capsys.readouterr().err
    assert not seen and sorted(p.name for p in package_folder.iterdir()) == ["search_spaces"]


def test_places_outside_the_package_folder_are_used_as_given(package_folder, tmp_path, sweeps, capsys):
    seen, _ = sweeps
    db, results = f"sqlite:///{tmp_path}/kept/mlflow.db", str(tmp_path / "kept" / "results")
    (tmp_path / "kept").mkdir()
    assert sweep("--space", "search_spaces/quickstart.yaml", "--mlflow-uri", db, "--storage-path", results) == 0
    assert [(cfg.tracking.uri, cfg.storage_path) for cfg in seen] == [(db, results)]
    assert capsys.readouterr().err == ""
    assert cluster.ray_package_folder(tmp_path) is None
    assert cluster.ray_package_folder(package_folder / "search_spaces") == package_folder


# --------------------------------------------------------------------------------------------
# The head's MLflow server as cluster.yaml starts and stops it (a fake `mlflow` on PATH)
# --------------------------------------------------------------------------------------------

FAKE_MLFLOW = """#!{python}
import http.server, os, signal, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
print("fake mlflow server starting", flush=True)
if os.environ.get("FAKE_MLFLOW_IGNORE_TERM"):  # like MLflow's job consumers
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("FAKE_MLFLOW_FAIL"):
    print("boom: cannot open the backend store", flush=True)
    sys.exit(1)
time.sleep(float(os.environ.get("FAKE_MLFLOW_DELAY", "0")))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


@pytest.fixture
def head_shell(tmp_path):
    """Runs cluster.yaml's MLflow head commands (stop, record, start) in a home of its own, with
    a fake ``mlflow`` and this test's ports."""
    home, bin_dir = tmp_path / "head-home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text(FAKE_MLFLOW.format(python=sys.executable))
    (bin_dir / "mlflow").chmod(0o755)
    port, gcs_port = free_port(), free_port()
    head = cluster_yaml()["head_start_ray_commands"]
    commands = [c for c in head if "mlflow" in c]
    assert len(commands) == 3 and "kill -TERM" in commands[0] and "mlflow server" in commands[2]
    # the watcher's poll every 1 s instead of 5 s, and 1 s instead of 30 before a SIGKILL, keep the test short
    mapping = {"5000": str(port), "/6379": f"/{gcs_port}", "sleep 5": "sleep 1", "$(seq 30)": "$(seq 1)"}
    for old, new in mapping.items():
        commands = [c.replace(old, new) for c in commands]
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def run(command: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], env={**env, **extra}, capture_output=True, text=True, timeout=90)

    pidfile = home / ".rayprune" / "mlflow_server.pid"
    yield home, port, gcs_port, commands, run
    if pidfile.exists():  # a failed test's server
        run(commands[0])


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def answers_http(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (with any status: 401 means it is there)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow  # it waits for the server's 1 s start and the watcher's 1 s poll
def test_ray_up_returns_when_the_server_answers_and_ray_stop_ends_it(head_shell):
    home, port, gcs_port, (stop, record, start), run = head_shell
    (home / "mlflow.log").write_text("the server of an earlier ray up\n")
    with listening(gcs_port) as gcs:  # the head's Ray is up
        for command in (stop, record):
            assert run(command).returncode == 0
        began = time.monotonic()
        started = run(start, FAKE_MLFLOW_DELAY="1", FAKE_MLFLOW_IGNORE_TERM="1")
        assert started.returncode == 0, started.stdout + started.stderr
        assert time.monotonic() - began >= 1 and answers(port)  # it returned once the server answered
        pgid = int((home / ".rayprune" / "mlflow_server.pid").read_text())
        assert group_alive(pgid)
        assert json.loads((home / ".rayprune" / "mlflow_server.json").read_text())["uri"] == f"http://127.0.0.1:{port}"
        log = (home / "mlflow.log").read_text()
        assert log.startswith("the server of an earlier ray up\n") and "fake mlflow server starting" in log
        gcs.close()  # `ray stop`: the GCS port stops answering
        deadline = time.monotonic() + 60  # a bound for a loaded machine: the watcher polls every 1 s
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not group_alive(pgid) and not answers(port)
    assert not (home / ".rayprune" / "mlflow_server.pid").exists()


@pytest.mark.slow  # two starts and two stops, each waiting out a 1 s poll
def test_a_second_ray_up_stops_the_first_server_before_starting_its_own(head_shell):
    """`ray down` can leave the head's server running; the next `ray up` runs stop, record and
    start again: the old server's whole group goes (SIGKILL after the grace, since it ignores
    SIGTERM like MLflow's job consumers) and the new one holds the port."""
    home, port, gcs_port, commands, run = head_shell
    pidfile = home / ".rayprune" / "mlflow_server.pid"
    with listening(gcs_port):
        groups = []
        for _ in range(2):
            for command in commands:
                done = run(command, FAKE_MLFLOW_IGNORE_TERM="1")
                assert done.returncode == 0, done.stdout + done.stderr
            groups.append(int(pidfile.read_text()))
        first, second = groups
        assert second != first and group_alive(second) and answers(port)
        assert gone(first)
        assert run(commands[0]).returncode == 0  # the stop command alone
        assert gone(second) and not pidfile.exists() and not answers(port)


def gone(pgid: int, bound_s: float = 60.0) -> bool:
    """Whether process group ``pgid`` ends: the stop command's last signal is a SIGKILL, whose
    delivery (and the reaping of the group) is asynchronous. The bound is for a loaded machine."""
    deadline = time.monotonic() + bound_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not group_alive(pgid)


@pytest.mark.slow  # it waits out the start command's 2 s bound
def test_a_server_that_does_not_answer_fails_ray_up_with_the_end_of_its_log(head_shell):
    _, port, gcs_port, (_, record, start), run = head_shell
    assert "$(seq 300)" in start  # the start command's bound, 300 polls 1 s apart: 2 here
    quick = start.replace("$(seq 300)", "$(seq 2)").replace("within 300 s", "within 2 s")
    with listening(gcs_port):
        assert run(record).returncode == 0
        failed = run(quick, FAKE_MLFLOW_FAIL="1")
    assert failed.returncode != 0
    assert failed.stdout.splitlines() == [
        f"the MLflow server did not answer http://127.0.0.1:{port}/health within 2 s; the end of ~/mlflow.log:",
        "fake mlflow server starting",
        "boom: cannot open the backend store",
    ]


def test_the_log_is_rotated_at_10_mb(head_shell):
    home, _, _, (stop, _, _), run = head_shell
    with open(home / "mlflow.log", "wb") as f:
        f.truncate(10_000_001)
    assert run(stop).returncode == 0
    assert (home / "mlflow.log.1").stat().st_size == 10_000_001 and not (home / "mlflow.log").exists()
    (home / "mlflow.log").write_text("small\n")
    assert run(stop).returncode == 0
    assert (home / "mlflow.log").read_text() == "small\n"  # below the limit it stays


# --------------------------------------------------------------------------------------------
# Token authentication
# --------------------------------------------------------------------------------------------


def test_every_node_runs_ray_with_token_authentication_and_gets_the_token_from_file_mounts():
    cfg = cluster_yaml()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (ray_start,) = [c for c in cfg[key] if "ray start" in c]
        assert "export RAY_AUTH_MODE=token; ray start " in ray_start, key
    # the shells `ray submit` / `ray exec` open on a node (they source ~/.bashrc) use it too
    assert "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in cfg["setup_commands"][0]
    # shipped from the user's machine, never from the repository
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


HAS_DASHBOARD = importlib.util.find_spec("aiohttp_cors") is not None  # ray[default]'s extras

CLIENT = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("answer", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


@pytest.fixture
def token_head(tmp_path):
    """A Ray head started with cluster.yaml's own head command (its own ports, `--block` so that
    it can be stopped alone: `ray stop` would stop every Ray on this machine), with the token
    where file_mounts puts it."""
    home = tmp_path / "head-home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    port, dashboard = free_port(), free_port()
    (command,) = [c for c in cluster_yaml()["head_start_ray_commands"] if "ray start --head" in c]
    command = (
        command.replace("ray start", "exec ray start")
        .replace("--port=6379", f"--port={port}")
        .replace("--object-manager-port=8076", f"--object-manager-port={free_port()}")
        .replace(" --autoscaling-config=~/ray_bootstrap_config.yaml", "")
    )
    command += " --block --num-cpus=1 --node-ip-address=127.0.0.1"
    if HAS_DASHBOARD:
        command += f" --dashboard-port={dashboard} --dashboard-agent-listen-port={free_port()}"
    else:
        command += " --include-dashboard=false"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the command sets the mode
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(["bash", "-c", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        assert head.poll() is None, head.stdout.read().decode() if head.stdout else ""
        yield f"127.0.0.1:{port}", token, dashboard, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def clients(address: str, env: dict, *extras: dict[str, str]) -> list[tuple[int, str, str]]:
    """Drivers that join ``address``, one per environment in ``extras``, run side by side:
    (exit status, stdout, stderr) each."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, address],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in extras
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    return [(run.returncode, out, err) for run, (out, err) in zip(runs, outputs, strict=True)]


@pytest.mark.slow
@pytest.mark.ray
def test_a_client_without_the_token_cannot_use_a_head_started_like_cluster_yaml(token_head, tmp_path):
    address, token, dashboard, env = token_head
    nobody = tmp_path / "no-token-home"
    nobody.mkdir()
    # one connection attempt for the refused ones instead of Ray's twenty (one per second)
    refused = {"HOME": str(nobody), "RAY_gcs_server_port_wait_time_s": "1"}
    (allowed, *others) = clients(
        address,
        env,
        {"RAY_AUTH_MODE": "token"},  # the token where file_mounts puts it
        refused,  # no token: Ray's default mode for an explicit address
        {**refused, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},  # another token
    )
    assert allowed[0] == 0 and "answer 42" in allowed[1], allowed[2][-2000:]
    for status, out, err in others:
        assert status != 0 and "answer" not in out
        assert "Authentication token is missing or incorrect" in err, err[-2000:]
    if HAS_DASHBOARD:  # the Jobs API runs code too
        from ray.job_submission import JobStatus, JobSubmissionClient

        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 60  # the dashboard starts after the GCS
        while not answers_http(url) and time.monotonic() < deadline:
            time.sleep(0.5)
        with pytest.raises(Exception, match=r"(?i)auth|401|403"):
            JobSubmissionClient(url).submit_job(entrypoint="echo nobody")
        jobs = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
        job = jobs.submit_job(entrypoint="python -c 'print(6 * 7)'")
        deadline = time.monotonic() + 60
        while jobs.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert jobs.get_job_status(job) == JobStatus.SUCCEEDED and "42" in jobs.get_job_logs(job)
