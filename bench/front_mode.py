"""Does the front mode find a better front than a fixed grid, at an equal number of trials?

Per seed, two whole sweeps (``run_sweep`` on a local Ray, the same method, recipes and seed):

* ``grid``: ``flops_targets: [0.3, 0.5, 0.7]``, ``--trials / 3`` trials per cell, each cell's
  chosen subnet fine-tuned with ``recipes.finetune``;
* ``front``: ``flops_targets: auto`` (range 0.2-0.9), ``--trials`` trials in one multi-objective
  study, ``--front-points`` points of its Pareto set fine-tuned with the same recipe (default 3:
  as many fine-tunes as the grid's cells).

Each arm's score is the hypervolume of its final front (the fine-tuned subnets' test top-1 against
their MACs as a fraction of the unpruned net's), with the unpruned baseline (its test top-1,
trained once per sweep with ``recipes.finetune``, averaged over the seed's two sweeps, and its
MACs, 1.0) as the reference point: the area of
the (MACs, top-1) plane its front dominates and that dominates the baseline. Where no subnet beats
the baseline's top-1, that area is 0, so the table also gives it with reference (top-1 0, MACs
1.0): the mean over the MACs axis of the best top-1 reached at or below each MACs fraction.

    .venv/bin/python bench/front_mode.py --smoke                    # one seed, 3 trials: the plan's time
    nice -n 5 .venv/bin/python bench/front_mode.py --seeds 0 1 2 --out bench/results/front_mode
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from rayprune import models
from rayprune.orchestration.config import parse_sweep
from rayprune.orchestration.front_mode import hypervolume
from rayprune.orchestration.sweep import run_sweep
from rayprune.tracking.store import SubnetStore

GRID_TARGETS = [0.3, 0.5, 0.7]
HPARAMS = {"l1": {"pretrain_epochs": 1, "bn_recal_batches": 2}, "uniform": {"eval_epochs": 1}}


def sweep_file(mode: str, args: argparse.Namespace, seed: int, workdir: Path) -> dict[str, Any]:
    """The sweep file of one arm: digits at 8x8, ``cifar_resnet:tiny``, no teacher, KD weight 0."""
    per_cell = args.trials // len(GRID_TARGETS)
    grid: dict[str, Any] = {"flops_targets": GRID_TARGETS, "kd_weights": [0.0]}
    if mode == "front":
        grid = {"flops_targets": "auto", "kd_weights": [0.0], "front_points": args.front_points}
    return {
        "name": f"{mode}-s{seed}",
        "dataset": {"name": "digits"},
        "model": "cifar_resnet:tiny",
        "shortcut": "avgpool_conv",
        "input_size": 8,
        "methods": [{"name": args.method, "hparams": HPARAMS.get(args.method, {})}],
        "grid": grid,
        "optuna": {
            "sampler": args.sampler,
            "seed": seed,
            "samples_per_cell": args.trials if mode == "front" else per_cell,
            "stage_prune": [[0.2, 0.8]] * 3,
        },
        "recipes": {
            "search": {"epochs": args.search_epochs, "batch_size": 64, "lr": 0.05},
            "finetune": {"epochs": args.finetune_epochs, "batch_size": 64, "lr": 0.05},
        },
        "resources": {"cpu": 1},
        "seed": seed,
        "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": f"{mode}-s{seed}"},
        "storage_path": str(workdir / "results"),
    }


def run_arm(mode: str, args: argparse.Namespace, seed: int, workdir: Path) -> dict[str, Any]:
    """One sweep; its final front, baseline and hypervolumes."""
    (workdir / f"{mode}-s{seed}").mkdir(parents=True, exist_ok=True)
    cfg = parse_sweep(sweep_file(mode, args, seed, workdir / f"{mode}-s{seed}"))
    start = time.monotonic()
    with open(workdir / f"{mode}-s{seed}.log", "w") as log:
        outcome = run_sweep(cfg, out=log)
    seconds = time.monotonic() - start
    full = models.macs(cfg.full_spec(), 8)
    store = SubnetStore(Path(outcome.experiment_path) / "rayprune" / "subnets.parquet")
    baseline = next(r for r in store.rows() if r["kind"] == "unpruned")["metrics"]["test_top1"]
    front = sorted((m["macs"] / full, m["metrics"]["test_top1"]) for m in outcome.fronts["final/kd0"])
    trials = len([r for r in store.rows() if r["kind"] == "final"])
    points = [(top1, macs) for macs, top1 in front]  # exact values; the record rounds them
    return {
        "mode": mode,
        "seed": seed,
        "trials": trials,
        "finetuned": len([r for r in store.rows() if r["kind"] == "finetuned"]),
        "baseline_top1": baseline,
        "front": [[round(m, 4), round(t, 4)] for m, t in front],
        "hv_zero": hypervolume(points, (0.0, 1.0)),
        "seconds": round(seconds, 1),
    }


def score_against_baseline(pair: list[dict[str, Any]]) -> None:
    """Both arms of a seed get one reference: the mean of the top-1 of the unpruned baseline each
    sweep trained (same recipe and seed; they differ by the run-to-run noise of CPU training)."""
    reference = statistics.mean(r["baseline_top1"] for r in pair)
    for r in pair:
        r["reference_top1"] = reference
        r["hv_baseline"] = hypervolume([(t, m) for m, t in r["front"]], (reference, 1.0))


def summary(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    """The results as a markdown table: every run, then mean +- std per arm and the paired difference."""
    lines = [
        f"# Front mode against a fixed grid (digits, `cifar_resnet:tiny`, {args.method}, {args.trials} trials per arm)",
        "",
        f"Command: `{command}`",
        "",
        "| seed | arm | trials | fine-tuned | final front (MACs fraction, test top-1) | HV (ref: baseline) | "
        "HV (ref: top-1 0) | baseline top-1 (this sweep's; reference: the pair's mean) | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        front = ", ".join(f"({m:.2f}, {t:.3f})" for m, t in r["front"])
        lines.append(
            f"| {r['seed']} | {r['mode']} | {r['trials']} | {r['finetuned']} | {front} | {r['hv_baseline']:.4f} | "
            f"{r['hv_zero']:.4f} | {r['baseline_top1']:.4f} ({r['reference_top1']:.4f}) | {r['seconds']:.0f} |"
        )
    lines += ["", "| arm | HV (ref: baseline), mean +- std | HV (ref: top-1 0), mean +- std |", "|---|---|---|"]
    for mode in ("grid", "front"):
        mine = [r for r in rows if r["mode"] == mode]
        lines.append(
            f"| {mode} | {_mean_std([r['hv_baseline'] for r in mine])} | {_mean_std([r['hv_zero'] for r in mine])} |"
        )
    pairs = [
        (f, g) for f in rows for g in rows if f["mode"] == "front" and g["mode"] == "grid" and f["seed"] == g["seed"]
    ]
    for key, name in (("hv_baseline", "ref: baseline"), ("hv_zero", "ref: top-1 0")):
        diffs = [f[key] - g[key] for f, g in pairs]
        wins = sum(d > 0 for d in diffs)
        lines.append(f"\nfront - grid, {name}: {_mean_std(diffs)} (front higher in {wins} of {len(diffs)} seeds)")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=6, help="per arm; the grid gets trials/3 per target")
    parser.add_argument("--front-points", type=int, default=3)
    parser.add_argument("--method", default="l1")
    parser.add_argument("--sampler", default="random")
    parser.add_argument("--search-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="one seed, 3 trials, 1-epoch recipes")
    parser.add_argument("--out", help="write OUT.jsonl and OUT.md")
    parser.add_argument("--workdir", help="sweeps go here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.trials, args.search_epochs, args.finetune_epochs = args.seeds[:1], 3, 1, 1
    command = "python bench/front_mode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(args.workdir or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for seed in args.seeds:
                pair = [run_arm(mode, args, seed, workdir) for mode in ("grid", "front")]
                score_against_baseline(pair)
                for row in pair:
                    print(json.dumps(row), flush=True)
                rows += pair
    finally:
        ray.shutdown()
    text = summary(rows, args, command)
    print(text)
    if args.out:
        Path(f"{args.out}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        Path(f"{args.out}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
