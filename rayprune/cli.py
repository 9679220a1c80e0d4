"""The `rayprune` command line: inspect, run, teacher, sweep, front, pick.

Every bad input exits non-zero with one line ``rayprune: error: ...`` naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from .registry import UnknownNameError

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def one_line(err: BaseException) -> str:
    """Condense an exception (pydantic's multi-line ones included) into one readable line."""
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"]) or err.title
            parts.append(f"{loc}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and e["type"] != "missing" else ""))
        return f"invalid {err.title}: " + "; ".join(parts)
    text = str(err).strip().replace("\n", " ")
    return text or type(err).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    from .engine.data import DataError
    from .models.base import SpecError

    return (CliError, SpecError, DataError, UnknownNameError, ValidationError, FileNotFoundError, ValueError)


def fail(msg: str) -> int:
    print(f"rayprune: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import models

    spec = models.load_spec(args.spec)
    size = models.input_size_of(spec, args.input_size)
    layers = models.layers(spec, size)
    full = None
    out: dict[str, Any] = {
        "family": spec["family"], "input_size": size, "macs": sum(l.macs for l in layers),
        "params": sum(l.params for l in layers),
        "groups": [{"name": g.name, "width": g.width, "stage": g.stage, "kind": g.kind} for g in models.channel_groups(spec)],
        "layers": [l.to_dict() for l in layers],
    }
    if args.reference:
        full = models.full_spec(args.reference, num_classes=spec["num_classes"],
                                **({"shortcut": spec["shortcut"]} if "shortcut" in spec else {}))
        out["reference_macs"] = models.macs(full, size)
        out["macs_ratio"] = out["macs"] / out["reference_macs"]
    print(json.dumps(out, indent=None if args.compact else 1))
    return 0


# ---------------------------------------------------------------------------------------------
# run / teacher
# ---------------------------------------------------------------------------------------------


def parse_assignments(items: Sequence[str], what: str) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when possible (numbers, bools, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what}: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_rates(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise CliError(f"--max-stage-prune: expected comma-separated rates like 0.5,0.5,0.6, got {text!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from .methods import get_method
    from .runner import TrialConfig, run_trial, train_teacher

    method = get_method(args.method)
    hparams = dict(method.smoke) if args.smoke else {}
    hparams.update(parse_assignments(args.set, "--set"))
    user_finetune = parse_assignments(args.finetune, "--finetune")
    # The method's preferred fine-tune (AST: from its inherited weights at a small lr) fills in
    # what the user left unset; a sweep instead gives every method the sweep file's recipe.
    finetune = {**method.finetune_defaults, **user_finetune}
    if args.model is not None:
        from . import models

        method.check_spec(models.full_spec(args.model, **({"shortcut": args.shortcut} if args.shortcut else {})))
    out = Path(args.out)
    teacher = args.teacher
    if args.kd_weight > 0 and teacher is None:
        if args.teacher_epochs <= 0:
            raise CliError("--kd-weight > 0 (robust mode) needs a teacher: pass --teacher DIR "
                           "(a saved subnet) or --teacher-epochs N to train one first")
        recipe = {**user_finetune, "epochs": args.teacher_epochs}
        teacher = str(train_teacher(args.model, args.dataset, out / "teacher", shortcut=args.shortcut,
                                    data_dir=args.data_dir, seed=args.seed, device=args.device, recipe=recipe,
                                    train_subset=args.train_subset, test_subset=args.test_subset))
    cfg = TrialConfig(method=args.method, hparams=hparams, model=args.model, shortcut=args.shortcut,
                      dataset=args.dataset, data_dir=args.data_dir, flops_target=args.flops_target,
                      kd_weight=args.kd_weight, max_stage_prune=parse_rates(args.max_stage_prune), seed=args.seed,
                      device=args.device, finetune=finetune, teacher=teacher, max_steps=args.max_steps,
                      input_size=args.input_size, train_subset=args.train_subset, test_subset=args.test_subset)

    def report(step) -> None:
        best = max((s.metrics.get("val_top1", 0.0) for s in step.subnets), default=float("nan"))
        macs = [s.macs for s in step.subnets]
        print(json.dumps({"step": step.step, "subnets": len(step.subnets), "best_val_top1": best,
                          "macs": macs[:8], **{k: round(v, 6) for k, v in step.metrics.items()}}), flush=True)

    result = run_trial(cfg, out, resume=not args.no_resume, progress=args.progress, on_step=report)
    final = result["final"]
    summary = {"out": str(out), "method": args.method, "macs": final["macs"], "params": final["params"],
               "macs_ratio": final["macs"] / result["unpruned_macs"],
               **{k: final["metrics"][k] for k in ("val_top1", "test_top1", "robust_top1") if k in final["metrics"]}}
    print(json.dumps(summary))
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from .models import io as subnet_io
    from .runner import train_teacher

    recipe = {**parse_assignments(args.finetune, "--finetune"), "epochs": args.epochs}
    out = train_teacher(args.model, args.dataset, args.out, shortcut=args.shortcut, data_dir=args.data_dir,
                        seed=args.seed, device=args.device, recipe=recipe, progress=args.progress,
                        train_subset=args.train_subset, test_subset=args.test_subset)
    saved = subnet_io.load(out)
    print(json.dumps({"out": str(out), **saved.metrics, "macs": saved.record["macs"]}))
    return 0


# ---------------------------------------------------------------------------------------------
# sweep / front / pick: delegated to the orchestration and tracking layers
# ---------------------------------------------------------------------------------------------


def _delegate(module: str, func: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(argv) or 0)

    return run


DELEGATED = {
    "sweep": ("rayprune.orchestration.sweep", "main", "run a sweep on Ray (same as python launch/sweep.py)"),
    "front": ("rayprune.tracking.cli", "front_main", "print the Pareto front of an experiment"),
    "pick": ("rayprune.tracking.cli", "pick_main", "export the efficient or robust operating point"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayprune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("inspect", help="MACs, params, channel groups and per-layer table of a spec, as JSON")
    i.add_argument("spec", help="path to a spec JSON file")
    i.add_argument("--input-size", type=int, default=None, help="input resolution (family default if omitted)")
    i.add_argument("--reference", default=None, help="FAMILY:VARIANT to report macs_ratio against, e.g. cifar_resnet:56")
    i.add_argument("--compact", action="store_true", help="one-line JSON")
    i.set_defaults(func=cmd_inspect)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", required=True, help="FAMILY:VARIANT, e.g. cifar_resnet:56")
        q.add_argument("--shortcut", default=None, help="cifar_resnet stride-2 shortcut: option_a|avgpool_conv|conv_bn")
        q.add_argument("--dataset", default="cifar10", help="cifar10|cifar100|imagenet|digits|synthetic")
        q.add_argument("--data-dir", default=None, help="dataset folder (else $RAYPRUNE_DATA_DIR, else ~/.cache/rayprune/data)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default=None, help="cpu|cuda (default: cuda when available)")
        q.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                       help="training recipe override (engine TrainConfig field), repeatable")
        q.add_argument("--progress", action="store_true", default=None, help="force a progress bar")
        q.add_argument("--train-subset", type=int, default=None, metavar="N",
                       help="use N class-balanced training images (quick runs)")
        q.add_argument("--test-subset", type=int, default=None, metavar="N", help="use N class-balanced test images")

    r = sub.add_parser("run", help="run one method as a plain-torch trial (no Ray)")
    r.add_argument("--method", required=True, help="ast|tas|sp|uniform|l1|fpgm|random")
    common(r)
    r.add_argument("--flops-target", type=float, required=True, help="target MACs as a fraction of the unpruned net")
    r.add_argument("--kd-weight", type=float, default=0.0, help="distillation weight (0 = efficient mode)")
    r.add_argument("--max-stage-prune", default=None, help="per-stage maximum pruning rates, e.g. 0.5,0.6,0.7")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter, repeatable")
    r.add_argument("--smoke", action="store_true", help="start from the method's seconds-long smoke hyperparameters")
    r.add_argument("--teacher", default=None, help="saved teacher dir (spec.json + weights.pt)")
    r.add_argument("--teacher-epochs", type=int, default=0, help="train a teacher first (when --kd-weight > 0 and no --teacher)")
    r.add_argument("--max-steps", type=int, default=None, help="stop the search after this many steps")
    r.add_argument("--input-size", type=int, default=None)
    r.add_argument("--no-resume", action="store_true", help="ignore a previous state in --out")
    r.add_argument("--out", required=True, help="output directory (resumed if it holds a previous run)")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("teacher", help="train the unpruned network once and save it as a teacher")
    common(t)
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_teacher)

    for name, (_, _, help_text) in DELEGATED.items():
        d = sub.add_parser(name, help=help_text, add_help=False)
        d.set_defaults(delegated=name)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module, func, _ = DELEGATED[argv[0]]
        command: Callable[[], int] = lambda: _delegate(module, func)(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command = lambda: args.func(args)
    try:
        return command()
    except _user_errors() as e:
        if os.environ.get("RAYPRUNE_DEBUG"):
            raise
        return fail(one_line(e))
    except KeyboardInterrupt:
        return fail("interrupted; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
