"""The sweep driver's own cost at scale (issue 15, P4): hundreds of near-instant trials.

Starts a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs plus
``--workers`` worker nodes of ``--cpus-per-worker`` CPUs each), then runs one sweep of
``--trials`` trials of the test-only ``instant`` method (:mod:`rayprune.testing.instant`: each
trial reports ``--subnets`` subnet records per step and trains nothing; every trial of a cell
after the first reuses the cell's final training from the sweep's cache) through the real
driver: ``run_sweep``, the per-cell Optuna searcher, the tracking callback writing MLflow and
``subnets.parquet``. It prints, overall and per window of ``--window`` completed trials:

* **per-trial driver overhead**: ``(wall - busy / slots) / trials``, where ``busy`` is the sum
  of the trials' own ``time_total_s`` and ``slots`` the number of trials Ray can run at once;
* **efficiency** of a sweep whose trials take ``T`` seconds: ``T / (T + overhead)`` (busy time
  / (slots x wall)), derived from the measured overhead for T = 30 s and 300 s;
* the **MLflow** and **parquet** write rates (time the driver spent in them; subnet records per
  second), and the number of parquet rewrites;
* the driver's **peak memory** (``ru_maxrss``) and its RSS after each window.

    .venv/bin/python bench/sweep_overhead.py --trials 500 --out bench/results/sweep_overhead.json
    .venv/bin/python bench/sweep_overhead.py --trials 100 --sampler random     # a quick look

Figures depend on the machine (and on everything else running on it): the committed ones are in
``bench/results/sweep_overhead_<date>.md`` with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Filled in the driver process by the callback below and the timing wrappers.
STATS: dict = {
    "completed": [],
    "rss_mb": [],
    "mlflow_s": 0.0,
    "mlflow_calls": 0,
    "parquet_s": 0.0,
    "parquet_writes": 0,
    "tracker_s": 0.0,
}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(owner, name: str, counter: str, calls: str | None = None) -> None:
    """Wrap ``owner.name`` so that the time spent in it adds to ``STATS[counter]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            STATS[counter] += time.perf_counter() - t
            if calls:
                STATS[calls] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    """Time every MLflow client call, every parquet write and the tracking callback's hooks."""
    from mlflow import MlflowClient

    from rayprune.orchestration import sweep
    from rayprune.tracking.store import SubnetStore

    for name in (
        "create_run",
        "log_batch",
        "log_artifact",
        "log_artifacts",
        "set_terminated",
        "set_tag",
        "update_run",
        "get_run",
        "log_dict",
        "search_runs",
        "list_artifacts",
    ):
        _timed(MlflowClient, name, "mlflow_s", "mlflow_calls")
    for name in ("_write", "flush"):
        if hasattr(SubnetStore, name):
            _timed(SubnetStore, name, "parquet_s", "parquet_writes" if name == "_write" else None)
    for name in ("on_trial_start", "on_trial_result", "on_trial_complete"):
        _timed(sweep.TrackingCallback, name, "tracker_s")


def make_callback():
    from ray import tune

    class Recorder(tune.Callback):
        """Records each completed trial's own busy time and the moment it completed."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            STATS["completed"].append((time.monotonic(), float(last.get("time_total_s", 0.0))))
            if len(STATS["completed"]) % STATS["window"] == 0:
                STATS["rss_mb"].append((len(STATS["completed"]), rss_mb()))

    return Recorder()


def sweep_config(args, root: Path):
    from rayprune.orchestration.config import parse_sweep

    cells = args.cells
    targets = [round(0.6 + 0.3 * i / max(1, cells - 1), 3) for i in range(cells)]
    return parse_sweep(
        {
            "name": "overhead",
            "dataset": {"name": "synthetic"},
            "model": "cifar_resnet:tiny",
            "shortcut": "avgpool_conv",
            "input_size": 16,
            "methods": [{"name": "instant", "hparams": {"subnets": args.subnets, "steps": args.steps}}],
            "grid": {"flops_targets": targets, "kd_weights": [0.0]},
            "optuna": {
                "sampler": args.sampler,
                "seed": 0,
                "samples_per_cell": -(-args.trials // cells),
                "stage_prune": [[0.4, 0.6]] * 3,
            },
            "recipes": {"search": {"epochs": 1, "batch_size": 64}, "finetune": {"epochs": 1, "batch_size": 64}},
            "resources": {"cpu": 1},
            "tracking": {"uri": args.mlflow_uri or f"sqlite:///{root}/mlflow.db", "experiment": "overhead"},
            "storage_path": str(root / "results"),
            "finetune_front": False,
        }
    )


def start_mlflow_server(root: Path, args):
    """``mlflow server`` on a free loopback port; sets ``args.mlflow_uri`` to it."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/server.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start") from None
            time.sleep(0.5)
    args.mlflow_uri = f"http://127.0.0.1:{port}"
    return server


def window_rows(completed: list[tuple[float, float]], start: float, slots: int, window: int) -> list[dict]:
    rows, t0 = [], start
    for i in range(0, len(completed) - window + 1, window):
        chunk = completed[i : i + window]
        wall = chunk[-1][0] - t0
        busy = sum(b for _, b in chunk)
        rows.append(
            {
                "trials": f"{i + 1}-{i + window}",
                "wall_s": wall,
                "busy_s": busy,
                "overhead_s_per_trial": (wall - busy / slots) / window,
            }
        )
        t0 = chunk[-1][0]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=500)
    p.add_argument("--cells", type=int, default=2, help="grid cells (FLOPs targets); trials split evenly")
    p.add_argument("--subnets", type=int, default=10, help="subnet records each trial reports per step")
    p.add_argument("--steps", type=int, default=1, help="steps per trial")
    p.add_argument("--workers", type=int, default=2, help="worker nodes")
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    p.add_argument("--window", type=int, default=100, help="report figures per this many completed trials")
    p.add_argument("--mlflow-uri", default=None, help="default: a SQLite file in the temp dir")
    p.add_argument(
        "--mlflow-server",
        action="store_true",
        help="log over HTTP to an `mlflow server` started on 127.0.0.1 (SQLite backend, artifacts "
        "proxied to the temp dir), as on a cluster's head",
    )
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    from rayprune.orchestration.sweep import run_sweep
    from rayprune.testing.instant import RUNTIME_ENV

    instrument()
    STATS["window"] = args.window
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(args.workers):
        cluster.add_node(num_cpus=args.cpus_per_worker)
    cluster.wait_for_nodes()
    slots = args.workers * args.cpus_per_worker
    with tempfile.TemporaryDirectory() as tmp:
        server = start_mlflow_server(Path(tmp), args) if args.mlflow_server else None
        ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, log_to_driver=False)
        try:
            cfg = sweep_config(args, Path(tmp))
            rss_start = rss_mb()
            start = time.monotonic()
            with open(os.devnull, "w") as devnull:
                outcome = run_sweep(cfg, address=cluster.address, callbacks=[make_callback()], out=devnull)
            wall = time.monotonic() - start
        finally:
            ray.shutdown()
            cluster.shutdown()
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    completed = STATS["completed"]
    busy = sum(b for _, b in completed)
    trials = len(completed)
    overhead = (wall - busy / slots) / trials
    records = trials * args.subnets * args.steps
    figures = {
        "trials": trials,
        "complete": outcome.complete,
        "slots": slots,
        "nodes": 1 + args.workers,
        "subnet_records": records,
        "wall_s": wall,
        "busy_s": busy,
        "overhead_s_per_trial": overhead,
        "efficiency_at_30s": 30 / (30 + overhead),
        "efficiency_at_300s": 300 / (300 + overhead),
        "tracking_callback_s": STATS["tracker_s"],
        "mlflow_s": STATS["mlflow_s"],
        "mlflow_calls": STATS["mlflow_calls"],
        "mlflow_records_per_s": records / STATS["mlflow_s"] if STATS["mlflow_s"] else None,
        "mlflow_uri_scheme": (args.mlflow_uri or "sqlite").split(":")[0],
        "mlflow_ms_per_record": 1000 * STATS["mlflow_s"] / records if records else None,
        "mlflow_ms_per_call": 1000 * STATS["mlflow_s"] / STATS["mlflow_calls"] if STATS["mlflow_calls"] else None,
        "parquet_s": STATS["parquet_s"],
        "parquet_writes": STATS["parquet_writes"],
        "parquet_records_per_s": records / STATS["parquet_s"] if STATS["parquet_s"] else None,
        "rss_start_mb": rss_start,
        "peak_rss_mb": peak_mb(),
        "rss_mb_by_trials": STATS["rss_mb"],
        "windows": window_rows(completed, start, slots, args.window),
        "args": vars(args),
    }
    print(
        f"{trials} trials ({records} subnet records) on {1 + args.workers} nodes, {slots} slots: "
        f"wall {wall:.1f} s, busy {busy:.1f} s"
    )
    print(
        f"driver overhead per trial: {overhead:.3f} s (target <= 1 s); efficiency for 30 s trials "
        f"{figures['efficiency_at_30s']:.3f}, for 300 s trials {figures['efficiency_at_300s']:.4f}"
    )
    print(
        f"tracking callback: {STATS['tracker_s']:.1f} s in all; MLflow {STATS['mlflow_s']:.1f} s "
        f"({STATS['mlflow_calls']} calls, {figures['mlflow_ms_per_call'] or 0:.1f} ms each; "
        f"{figures['mlflow_ms_per_record'] or 0:.1f} ms per subnet record, "
        f"{figures['mlflow_records_per_s'] or 0:.0f} records/s over {figures['mlflow_uri_scheme']}); parquet "
        f"{STATS['parquet_s']:.1f} s ({STATS['parquet_writes']} writes, "
        f"{figures['parquet_records_per_s'] or 0:.0f} records/s)"
    )
    print(
        f"driver memory: {rss_start:.0f} MB at the start, peak {figures['peak_rss_mb']:.0f} MB; RSS after "
        + ", ".join(f"{n} trials {mb:.0f} MB" for n, mb in STATS["rss_mb"])
    )
    for row in figures["windows"]:
        print(
            f"  trials {row['trials']:>9}: wall {row['wall_s']:6.1f} s, busy {row['busy_s']:6.1f} s, "
            f"overhead {row['overhead_s_per_trial']:.3f} s/trial"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
