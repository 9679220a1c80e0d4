"""Do learned budgets beat random ones? The sweep's shared studies against random and uniform budgets.

Arms (issue 20, item 3), each driving the *same* search code the sweep uses
(:class:`rayprune.orchestration.search.StudyRounds`, one study per method across the FLOPs
targets, batch-synchronous rounds), without Ray:

* the learned samplers (``--learned``, default ``gp tpe``: GP and multivariate TPE);
* ``random``: random budgets (Optuna's ``RandomSampler``) through the same rounds;
* ``uniform``: the reference budget only (the loosest rates, equal shares), one trial per target.

One run of ``--trials`` trials (across the targets, in round order) per method, seed and arm;
the smaller trial counts (``--prefixes``) are its prefixes. Every trial runs like a sweep trial
(``rayprune.runner.run_trial``: the method, then its chosen subnet trained with the search recipe;
robust accuracy and latency off); a trial config run once is cached (``--workdir``), so the
reference trials shared by the arms run once. Per arm and trial count it reports the best
objective (gain in search-val top-1 over the reference at the same target) and the test top-1 of
each target's chosen subnet (best search-val, in its MACs constraint; every chosen subnet was
trained by the one search recipe), averaged over the targets, as mean +- std over seeds, and the
paired difference against random with a 95 % t interval. Decision rule: the learned sampler is
the default only where that interval is above zero.

Before it starts it runs one trial per method, and prints the plan and the estimated time
(``--plan-only``: then stops).

    .venv/bin/python bench/budget_search.py --smoke                  # < 1 min
    .venv/bin/python bench/budget_search.py --methods l1 --seeds 0 1 2 3 4 --jobs 2 \\
        --out bench/results/budget_search_digits_l1
    .venv/bin/python bench/budget_search.py --dataset cifar10 --data-dir ../shared/data --train-subset 5000 \\
        --model cifar_resnet:20 --methods l1 --seeds 0 1 --out bench/results/budget_search_cifar_l1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from rayprune import models
from rayprune.engine.data import DataError
from rayprune.methods import get_method
from rayprune.orchestration.config import Cell
from rayprune.orchestration.search import Outcome, Reachability, StudyRounds
from rayprune.orchestration.trial_spec import TrialSpec, shared_config
from rayprune.runner import run_trial, train_teacher

HPARAMS = {  # l1: the quickstart's; AST: its fast preset shortened to at most 4 one-epoch iterations
    "l1": {"pretrain_epochs": 1, "bn_recal_batches": 2},
    "ast": {
        "batch_size": 64,
        "max_iterations": 4,
        "min_iterations": 2,
        "noise_iterations": 2,
        "epochs_schedule": [(0, 1)],
        "alpha_passes": 1,
        "top_k": 2,
    },
}


Job = tuple[argparse.Namespace, dict[str, Any], str, int, str]  # (args, base config, method, seed, arm)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="1 seed, l1, 2 targets, 6 trials, gp only, 500 images, 1-epoch recipes"
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--model", default="cifar_resnet:tiny")
    p.add_argument("--shortcut", default="avgpool_conv")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=["l1"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--prefixes", nargs="+", type=int, default=[8, 16, 32])
    p.add_argument("--learned", nargs="+", default=["gp", "tpe"], choices=["gp", "tpe"])
    p.add_argument("--n-startup-trials", type=int, default=3)
    p.add_argument("--stage-prune", type=float, nargs=2, default=[0.2, 0.8], help="every stage's [low, high]")
    p.add_argument("--search-epochs", type=int, default=4, help="the search recipe (every trial's chosen subnet)")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1, help="(method, seed, arm) runs in parallel, one CPU thread each")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "rayprune_budget_search"))
    p.add_argument("--out", default=None, help="write OUT.md (tables) and OUT.jsonl (every trial)")
    p.add_argument("--plan-only", action="store_true", help="print the plan and estimate (one trial run), then stop")
    args = p.parse_args(argv)
    if args.smoke:
        args.methods, args.seeds, args.targets = ["l1"], [0], [0.5, 0.7]
        args.trials, args.prefixes, args.n_startup_trials, args.learned = 6, [4, 6], 1, ["gp"]
        args.search_epochs, args.teacher_epochs, args.train_subset = 1, 2, 500
        args.workdir = str(Path(args.workdir) / "smoke")
    return args


# --------------------------------------------------------------------------------------------
# One trial, as a sweep runs it (cached by its config)
# --------------------------------------------------------------------------------------------


def base_config(args: argparse.Namespace, teacher: str) -> dict[str, Any]:
    """The sweep's shared trial config (``param_space``'s ``base``) for this bench."""
    return {
        "model": args.model,
        "shortcut": args.shortcut,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "train_subset": args.train_subset,
        "input_size": args.input_size,
        "finetune": {"epochs": args.search_epochs, "batch_size": 64, "lr": 0.05},
        "teacher": teacher,
        "robust": False,
        "measure_latency": False,
    }


def run_cached(base: dict[str, Any], method: str, seed: int, sample: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Run one trial (``sample``: the searcher's config part) or read it from ``cache``."""
    config = {**shared_config({**base, "seed": seed}, {method: HPARAMS[method]}, 1, None), **sample}
    cfg = TrialSpec.from_config(config).trial_config()
    key = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:20]
    path = cache / f"{key}.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache) as out:
        result = run_trial(cfg, out, progress=False)
    final = result["final"]
    row = {
        "val_top1": final["metrics"]["val_top1"],
        "test_top1": final["metrics"]["test_top1"],
        "flops_fraction": final["macs"] / result["unpruned_macs"],
        "spec_hash": models.spec_hash(final["spec"]),
        "seconds": time.perf_counter() - start,
    }
    path.write_text(json.dumps(row))
    return row


# --------------------------------------------------------------------------------------------
# One arm: a study run through its rounds
# --------------------------------------------------------------------------------------------


def run_arm(args: argparse.Namespace, base: dict[str, Any], method: str, seed: int, arm: str) -> list[dict[str, Any]]:
    """Every trial of one (method, seed, arm) run, in round order (the first ``--trials``)."""
    cells = [Cell(method, t, 0.0) for t in args.targets]
    per_cell = 1 if arm == "uniform" else math.ceil(args.trials / len(cells))
    full = models.full_spec(args.model, num_classes=10, shortcut=args.shortcut)
    rounds = StudyRounds(
        cells,
        per_cell,
        [tuple(args.stage_prune)] * (1 + max(g.stage for g in models.channel_groups(full))),
        sampler="random" if arm == "uniform" else arm,
        seed=seed,
        n_startup_trials=args.n_startup_trials,
        feasibility=Reachability(full, args.input_size),
        budget_use={method: get_method(method).budget_use},
    )
    cache = Path(args.workdir) / "trials"
    cache.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    while not rounds.finished() and len(rows) < args.trials:
        for position, proposal in enumerate(rounds.next_round()):
            sample = rounds.config(position)
            result = run_cached(base, method, seed, sample, cache)
            rounds.report(position, Outcome("complete", result["val_top1"], result["flops_fraction"]))
            rows.append(
                {"method": method, "seed": seed, "arm": arm, "number": proposal.trial.number, **sample, **result}
            )
    told = [h for h in rounds.history if h["state"] == "complete"]
    for row, h in zip(rows, told, strict=False):
        row["objective"] = h["objective"]
    return rows[: args.trials]


def run_job(job: Job) -> list[dict[str, Any]]:
    """One (method, seed, arm) run on one CPU thread."""
    args, base, method, seed, arm = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run_arm(args, base, method, seed, arm)
    print(f"  {method} seed {seed} {arm}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def arm_jobs(args: argparse.Namespace, base: dict[str, Any]) -> list[Job]:
    """Every (method, seed, arm) run, arm by arm: the uniform runs (every other arm's reference
    trials) are cached first, an arm of one seed rarely runs beside another arm of that seed (they
    share their random start-up trials), and a run cut short has whole arms, the learned ones last."""
    arms = ("uniform", "random", *args.learned)
    return [(args, base, m, s, arm) for arm in arms for m in args.methods for s in args.seeds]


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def score(rows: list[dict[str, Any]], n: int) -> dict[str, float]:
    """The first ``n`` trials of one run: best objective, and the mean over targets of the test
    top-1 of each target's chosen subnet (best search-val within its MACs constraint)."""
    head = [r for r in rows[:n] if r["flops_fraction"] <= r["flops_target"]]
    chosen = {}
    for r in head:
        best = chosen.get(r["flops_target"])
        if best is None or r["val_top1"] > best["val_top1"]:
            chosen[r["flops_target"]] = r
    return {
        "objective": max((r["objective"] for r in head), default=float("nan")),
        "test_top1": statistics.fmean(r["test_top1"] for r in chosen.values()) if chosen else float("nan"),
        "targets_chosen": len(chosen),
    }


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval of paired differences."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def summarise(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, list[str]]:
    """The markdown tables (per method, arm and trial count) and one verdict line per method and count."""
    lines, verdicts = [], []
    for method in args.methods:
        lines += [
            f"\n### {method}\n",
            "| arm | trials | best objective (mean ± std) | test top-1 (mean ± std) | Δ test vs random [95 % CI] "
            "| Δ objective vs random [95 % CI] |",
            "|---|---|---|---|---|---|",
        ]
        for n in args.prefixes:
            per_arm = {}
            for arm in ("uniform", "random", *args.learned):
                per_arm[arm] = {
                    s: score([r for r in rows if (r["method"], r["seed"], r["arm"]) == (method, s, arm)], n)
                    for s in args.seeds
                }
            for arm, by_seed in per_arm.items():
                obj = [v["objective"] for v in by_seed.values()]
                test = [v["test_top1"] for v in by_seed.values()]
                d_test = interval([by_seed[s]["test_top1"] - per_arm["random"][s]["test_top1"] for s in args.seeds])
                d_obj = interval([by_seed[s]["objective"] - per_arm["random"][s]["objective"] for s in args.seeds])
                vs = "—" if arm == "random" else f"{d_test[0]:+.4f} [{d_test[1]:+.4f}, {d_test[2]:+.4f}]"
                vs_obj = "—" if arm == "random" else f"{d_obj[0]:+.4f} [{d_obj[1]:+.4f}, {d_obj[2]:+.4f}]"
                trials = len(args.targets) if arm == "uniform" else n
                lines.append(f"| {arm} | {trials} | {_ms(obj)} | {_ms(test)} | {vs} | {vs_obj} |")
                if arm in args.learned:
                    wins = d_test[1] > 0
                    verdicts.append(
                        f"{method}, {n} trials: {arm} - random test top-1 {d_test[0]:+.4f} "
                        f"[{d_test[1]:+.4f}, {d_test[2]:+.4f}] -> {'learned' if wins else 'random'} "
                        f"({'interval above zero' if wins else 'interval not above zero'})"
                    )
    return "\n".join(lines), verdicts


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def prepare_teacher(args: argparse.Namespace) -> str | None:
    """The unpruned net trained once (seed 0), shared by every trial as l1's ranking source; None:
    the dataset is absent (a clean skip)."""
    out = Path(args.workdir) / f"teacher_{args.dataset}_{args.model.replace(':', '_')}_{args.teacher_epochs}"
    try:
        train_teacher(
            args.model,
            args.dataset,
            out,
            shortcut=args.shortcut,
            data_dir=args.data_dir,
            recipe={"epochs": args.teacher_epochs, "batch_size": 64, "lr": 0.05},
            progress=False,
            train_subset=args.train_subset,
        )
    except DataError as e:
        print(f"skipped: {e}")
        return None
    return str(out)


def plan(args: argparse.Namespace, base: dict[str, Any]) -> None:
    """Time one (reference) trial per method, then print the plan and the estimated time."""
    runs = len(args.seeds)
    arms = "/".join(["uniform", "random", *args.learned])
    print(f"Plan: methods {args.methods}, seeds {args.seeds}, targets {args.targets}, arms {arms}")
    print(
        f"  one {args.trials}-trial run per (method, seed, arm); reported at {args.prefixes} trials; {args.jobs} job(s)"
    )
    total = 0.0
    for method in args.methods:
        sample = run_arm_first_sample(args, method)
        result = run_cached(base, method, args.seeds[0], sample, Path(args.workdir) / "trials")
        unique = runs * (len(args.targets) + (1 + len(args.learned)) * (args.trials - len(args.targets)))
        estimate = unique * result["seconds"] / max(1, min(args.jobs, runs))
        total += estimate
        print(
            f"  {method}: {result['seconds']:.1f} s per trial (measured), {unique} trials -> ~{estimate / 60:.1f} min"
        )
    print(f"  estimated total: ~{total / 60:.1f} min (plus the learned sampler's own time)", flush=True)


def run_arm_first_sample(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The first reference trial's config part (the bench's first trial anyway: it is cached)."""
    full = models.full_spec(args.model, num_classes=10, shortcut=args.shortcut)
    stages = 1 + max(g.stage for g in models.channel_groups(full))
    rounds = StudyRounds(
        [Cell(method, t, 0.0) for t in args.targets],
        1,
        [tuple(args.stage_prune)] * stages,
        seed=args.seeds[0],
        budget_use={method: get_method(method).budget_use},
    )
    rounds.next_round()
    return rounds.config(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    teacher = prepare_teacher(args)
    if teacher is None:
        return 0
    base = base_config(args, teacher)
    plan(args, base)
    if args.plan_only:
        return 0
    jobs = arm_jobs(args, base)
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            rows = [r for part in pool.map(run_job, jobs, chunksize=1) for r in part]
    else:
        rows = [r for job in jobs for r in run_job(job)]
    tables, verdicts = summarise(rows, args)
    command = "python bench/budget_search.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = (
        f"## budget_search: {args.dataset} {args.model}\n\n`{command}`\n\n"
        f"{time.perf_counter() - start:.0f} s wall, {len(rows)} trial rows{tables}\n\nDecision rule:\n"
        + "\n".join(f"- {v}" for v in verdicts)
        + "\n"
    )
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.md").write_text(report)
        Path(f"{args.out}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
