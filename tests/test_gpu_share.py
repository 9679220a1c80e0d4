"""Fractional-GPU trials (issue 15): on a local Ray with one logical GPU, trials asking for
half of it run two at once, never three, and their records say the GPU was shared. The trials
compute on the CPU (``device: cpu``) with the near-instant method, so the sweep costs Ray
start-up and three trial workers (a GPU trial never reuses another's worker). Half, not a
quarter: the packing is the same arithmetic, and each trial worker costs ~8 CPU-s of imports."""

from __future__ import annotations

import io
from pathlib import Path
from typing import ClassVar

import pytest
import ray
from ray import tune

from rayprune.orchestration.config import parse_sweep
from rayprune.orchestration.sweep import run_sweep
from rayprune.testing.instant import RUNTIME_ENV
from rayprune.testing.sweeps import mini_sweep
from rayprune.tracking.store import SubnetStore

pytestmark = [pytest.mark.slow, pytest.mark.ray]


class Concurrency(tune.Callback):
    """The most trials Tune had RUNNING at once, and the GPUs Ray had free at that moment."""

    seen: ClassVar[list] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        running = sum(t.status == "RUNNING" for t in trials)
        Concurrency.seen.append((running, ray.available_resources().get("GPU", 0.0)))


def test_half_gpu_trials_pack_two_to_a_gpu(tmp_path):
    """Three 0.5-GPU trials of one cell in rounds of two: the first two wait for each other
    (so two run at once whatever the load), the third runs after them and reuses their
    training from the sweep's cache."""
    assert not ray.is_initialized()
    ray.init(
        address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, runtime_env=RUNTIME_ENV
    )
    meet = {"meet": 2, "meet_dir": str(tmp_path / "meet")}
    try:
        cfg = parse_sweep(
            mini_sweep(
                tmp_path,
                methods=[{"name": "instant", "hparams": {"steps": 1, "busy_s": 1.0, "subnets": 2, **meet}}],
                grid={"flops_targets": [0.7], "kd_weights": [0.0]},
                teacher=None,
                optuna={
                    "sampler": "random",
                    "samples_per_cell": 3,
                    "trials_per_round": 2,
                    "seed": 0,
                    "stage_prune": [[0.3, 0.8]] * 3,
                },
                resources={"cpu": 0.5, "gpu": 0.5},
                max_concurrent_trials=None,  # as many at once as the GPU shares allow
                device="cpu",
                finetune_front=False,
            )
        )
        Concurrency.seen = []
        outcome = run_sweep(cfg, callbacks=[Concurrency()], out=io.StringIO())
    finally:
        ray.shutdown()
    assert outcome.complete and outcome.num_trials == 3
    most = max(running for running, _ in Concurrency.seen)
    assert most == 2  # two 0.5-GPU trials on the one GPU (the baseline task takes a share at first), never three
    assert all(free >= -1e-9 for _, free in Concurrency.seen)
    rows = SubnetStore(Path(outcome.experiment_path) / "rayprune" / "subnets.parquet").rows()
    trained = [r for r in rows if r["kind"] == "final" and not r["source"].get("reused_from")]
    assert trained and all(r["source"]["latency_shared_gpu"] == 0.5 for r in trained)
    reused = [r for r in rows if r["kind"] == "final" and r["source"].get("reused_from")]
    assert reused and all(r["source"]["latency_shared_gpu"] == 0.5 for r in reused)  # the cached training's flag
    (baseline,) = [r for r in rows if r["kind"] == "unpruned"]
    assert baseline["source"]["latency_shared_gpu"] == 0.5  # measured beside the trials, on a share too
