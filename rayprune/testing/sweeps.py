"""A tiny sweep file, for tests of the orchestration layer (seconds per trial on a CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def mini_sweep(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A sweep file as a dict: 2 FLOPs targets x 2 KD weights (a teacher trained for 1 epoch),
    one random-search trial per cell on ``cifar_resnet:tiny`` and synthetic 8x8 images, one trial
    at a time, tracking and storage under ``tmp_path``. Top-level keys in ``overrides`` replace the
    defaults (``max_concurrent_trials=None``: as many trials at once as the CPUs allow).

    One trial at a time: a sweep's trials then share one Ray worker (Tune reuses a CPU trial's
    actor), and each worker costs seconds of CPU to start (torch, Tune) against well under a
    second for a trial of this size."""
    raw = {
        "name": "mini",
        "dataset": {"name": "synthetic"},
        "model": "cifar_resnet:tiny",
        "shortcut": "avgpool_conv",
        "input_size": 8,  # synthetic images made at 8x8: a quarter of the work of 16x16, same code paths
        "methods": [{"name": "random", "hparams": {"samples": 2, "eval_epochs": 1}}],
        "grid": {"flops_targets": [0.5, 0.7], "kd_weights": [0.0, 0.9]},
        "optuna": {"samples_per_cell": 1, "seed": 3, "stage_prune": [[0.3, 0.8]] * 3},
        "teacher": {"recipe": {"epochs": 1, "batch_size": 64}},
        "recipes": {"search": {"epochs": 1, "batch_size": 64}, "finetune": {"epochs": 1, "batch_size": 64}},
        "resources": {"cpu": 1},
        "max_concurrent_trials": 1,
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "mini"},
        "storage_path": str(tmp_path / "results"),
    }
    raw.update(overrides)
    return raw
