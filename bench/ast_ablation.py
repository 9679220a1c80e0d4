"""AST against random search and uniform pruning at equal cost (issue: "AST that learns").

Arms, each fine-tuned with the *same* recipe (``--finetune-*``) and landing in the same MACs window:

* ``ast``: AST with its defaults (``--preset``), stopping on convergence;
* ``random``: the random-search arm: α frozen (uniform), ThreshNet off (fixed τ), no convergence
  stop, as many search iterations as the ``ast`` run of the same seed used, best sample by
  search-val;
* ``uniform``: one width multiplier, bisected to the target.

Prints one JSON line per (arm, target, seed) and a summary table with the per-arm mean test top-1.

    .venv/bin/python bench/ast_ablation.py --dataset digits --model cifar_resnet:tiny --input-size 8 \\
        --targets 0.5 0.7 --seeds 0 1 2
    .venv/bin/python bench/ast_ablation.py --dataset cifar10 --data-dir ../shared/data --train-subset 5000 \\
        --model cifar_resnet:20 --targets 0.5 --seeds 0 --finetune-epochs 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rayprune import models
from rayprune.engine.train import TrainConfig
from rayprune.methods import Budget, RunContext, get_method
from rayprune.methods.finetune import finalize
from rayprune.runner import load_data


def run_arm(arm: str, ctx: RunContext, ast_hparams: dict, iterations: int | None) -> tuple[dict, int]:
    """Search with one arm, fine-tune its result; returns (row, search iterations used)."""
    if arm == "uniform":
        method, hparams = "uniform", {}
    elif arm == "ast":
        method, hparams = "ast", dict(ast_hparams)
    else:
        method, hparams = (
            "ast",
            {
                **ast_hparams,
                "freeze_alpha": True,
                "threshnet": False,
                "stop_on_convergence": False,
                "max_iterations": iterations,
            },
        )
    m = get_method(method)(ctx, hparams)
    start = time.perf_counter()
    steps = m.run()
    search_s = time.perf_counter() - start
    final = finalize(m)
    full = models.macs(ctx.spec, ctx.input_size)
    used = int(getattr(m, "iteration", len(steps)))
    row = {
        "arm": arm,
        "target": ctx.budget.flops_target,
        "seed": ctx.seed,
        "search_iterations": used,
        "converged": bool(getattr(getattr(m, "convergence", None), "converged", False)),
        "macs_ratio": final.record.macs / full,
        "val_top1": final.record.metrics.get("val_top1"),
        "test_top1": final.record.metrics["test_top1"],
        "init": final.record.source.get("init"),
        "search_s": round(search_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
    }
    return row, used


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--model", default="cifar_resnet:tiny")
    p.add_argument("--shortcut", default="avgpool_conv")
    p.add_argument("--input-size", type=int)
    p.add_argument("--train-subset", type=int)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["ast", "random", "uniform"])
    p.add_argument("--ast", default="{}", help="AST hyperparameters as JSON (shared by the ast and random arms)")
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--finetune-lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="append the JSON rows to this file")
    args = p.parse_args()
    train, test = load_data(args.dataset, args.data_dir, args.train_subset)
    spec = models.full_spec(args.model, num_classes=train.num_classes, shortcut=args.shortcut)
    ast_hparams = {"batch_size": args.batch_size, **json.loads(args.ast)}
    recipe = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.batch_size, warmup_epochs=0)
    rows = []
    for target in args.targets:
        for seed in args.seeds:
            ctx = RunContext(
                spec=spec,
                train=train,
                test=test,
                budget=Budget(flops_target=target),
                device=args.device,
                seed=seed,
                finetune=recipe,
                input_size=args.input_size or train.input_size,
                progress=False,
                measure_latency=False,
                robust=False,
            )
            iterations = None
            for arm in args.arms:
                row, used = run_arm(arm, ctx, ast_hparams, iterations)
                if arm == "ast":
                    iterations = used
                row["recipe"] = {"epochs": recipe.epochs, "lr": recipe.lr, "schedule": recipe.schedule}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with Path(args.out).open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print("\narm      mean test top-1  (per seed and target)")
    for arm in args.arms:
        tops = [r["test_top1"] for r in rows if r["arm"] == arm]
        print(f"{arm:8s} {statistics.mean(tops):.4f}           {[round(t, 4) for t in tops]}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
