"""Joining a running Ray cluster, the way `ray submit` runs launch/sweep.py on a head node:
a head started with `ray start --head`, then `python launch/sweep.py --address auto` with
RAY_ADDRESS pointing at it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A head of its own (`ray start --head --block`), torn down by signalling that process only:
    `ray stop` would also kill every other Ray on this machine."""
    port = free_port()
    # One auth mode for the head and every client (the `ray` CLI does not pick up a token file
    # by itself); a loopback-only test cluster needs none.
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--node-ip-address",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_until_up(address, head)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def _wait_until_up(address: str, head: subprocess.Popen, timeout: float = 300) -> None:
    """Until `ray start` says the runtime started (it prints that once the head's GCS and raylet
    are up; reading its output costs nothing, polling `ray status` a CPU second a call)."""
    seen: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in head.stdout:
            seen.append(line)
            if "Ray runtime started" in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not started.wait(0.2):
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head at {address} did not come up in {timeout} s: {''.join(seen)[-2000:]}")


def one_cell_sweep(tmp_path: Path) -> dict:
    return {
        "name": "joined",
        "dataset": {"name": "synthetic"},
        "model": "cifar_resnet:tiny",
        "input_size": 8,  # synthetic images made at 8x8: seconds of training
        "methods": [{"name": "uniform", "hparams": {"eval_epochs": 1}}],
        "grid": {"flops_targets": [0.6], "kd_weights": [0.0]},
        "optuna": {"samples_per_cell": 1, "stage_prune": [[0.2, 0.7]] * 3},
        "recipes": {"search": {"epochs": 1, "batch_size": 64}, "finetune": {"epochs": 1, "batch_size": 64}},
        "resources": {"cpu": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "joined"},
        "storage_path": str(tmp_path / "results"),
        "finetune_front": False,
    }


def test_sweep_joins_a_running_cluster_with_address_auto(ray_head, tmp_path, migrated_mlflow_store):
    address, env = ray_head
    migrated_mlflow_store(tmp_path / "mlflow.db")  # the driver's own migrations: seconds of CPU
    (tmp_path / "joined.yaml").write_text(yaml.safe_dump(one_cell_sweep(tmp_path)))
    env = {**env, "RAY_ADDRESS": address}
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "sweep.py"), "--space", "joined.yaml", "--address", "auto"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    port = address.rsplit(":", 1)[1]  # the head advertises the machine's IP, not the loopback one
    assert re.search(rf"^Ray cluster at [\d.]+:{port} \(joined\): 2 CPUs, 0 GPUs$", out.stdout, re.M), out.stdout[:500]
    assert "Started a local Ray instance" not in log
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out.stdout
    (experiment,) = (tmp_path / "results").iterdir()
    assert (experiment / "rayprune" / "subnets.parquet").is_file()
    assert len(list(experiment.glob("uniform_*/checkpoint_*/final/weights.pt"))) == 1
