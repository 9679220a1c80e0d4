"""The `rayprune` command line: inspect, run, teacher, sweep, front, pick.

This module holds every argparse parser and the one error boundary of every command; the work
is done by the layers below (:mod:`rayprune.runner`, :mod:`rayprune.orchestration.sweep`,
:mod:`rayprune.tracking.commands`). Bad input raises a :class:`~rayprune.errors.RaypruneError`
(argparse's errors a :class:`CliError`) in any layer, a Ray task's included: it exits 2 with one
line ``rayprune: error: <what>; <fix>``, where this module names its flags (:data:`HINTS`,
:data:`OPTION_FLAGS`). Any other error is a bug: one line says so, with ``RAYPRUNE_DEBUG=1`` as
the way to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError

from .errors import InputError, RaypruneError, explain, field_path, validated

if TYPE_CHECKING:
    from .orchestration.config import SweepConfig

EXIT_USAGE = 2
EXIT_FAILED = 1
_SUFFIXES = {"K": 1e3, "M": 1e6, "G": 1e9}


class CliError(RaypruneError):
    """A user-facing error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``rayprune: error:`` line, not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)")


def fail(msg: str, status: int = EXIT_USAGE) -> int:
    """Print ``rayprune: error: <msg>`` (its first line) on stderr; return ``status``."""
    first = msg.strip().splitlines()[0] if msg.strip() else "unknown error"
    print(f"rayprune: error: {first}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import models

    spec = models.load_spec(args.spec)
    size = models.input_size_of(spec, args.input_size)
    layers = models.layers(spec, size)
    out: dict[str, Any] = {
        "family": spec["family"],
        "input_size": size,
        "macs": sum(layer.macs for layer in layers),
        "params": sum(layer.params for layer in layers),
        "groups": [
            {"name": g.name, "width": g.width, "stage": g.stage, "kind": g.kind} for g in models.channel_groups(spec)
        ],
        "stages": 1 + max(g.stage for g in models.channel_groups(spec)),  # max_stage_prune takes one rate each
        "layers": [layer.to_dict() for layer in layers],
    }
    if args.reference:
        full = models.full_spec(
            args.reference,
            num_classes=spec["num_classes"],
            **({"shortcut": spec["shortcut"]} if "shortcut" in spec else {}),
        )
        out["reference"] = args.reference
        out["reference_macs"] = models.macs(full, size)
        out["macs_ratio"] = out["macs"] / out["reference_macs"]
    if args.json:
        print(json.dumps(out, indent=None if args.compact else 1))
    else:
        print(format_inspection(args.spec, out))
    return 0


def format_inspection(path: str, info: dict[str, Any]) -> str:
    """``inspect``'s record as a summary line and two tables (channel groups, layers)."""
    from .tables import aligned

    size = info["input_size"]
    head = f"{path}: {info['family']}, input {size}x{size}, {info['macs']:,} MACs, {info['params']:,} params"
    head += f", {info['stages']} stages"
    if "reference_macs" in info:
        head += f"; {100.0 * info['macs_ratio']:.1f}% of {info['reference']}'s {info['reference_macs']:,} MACs"
    groups = [["channel group", "width", "stage", "kind"]]
    groups += [[g["name"], str(g["width"]), str(g["stage"]), g["kind"]] for g in info["groups"]]
    layers = [["layer", "kind", "in", "out", "kernel", "stride", "output", "MACs", "params"]]
    layers += [
        [
            layer["name"],
            layer["kind"],
            str(layer["in_channels"]),
            str(layer["out_channels"]),
            str(layer["kernel"]),
            str(layer["stride"]),
            "x".join(map(str, layer["out_hw"])),
            f"{layer['macs']:,}",
            f"{layer['params']:,}",
        ]
        for layer in info["layers"]
    ]
    return "\n\n".join(
        [head, aligned(groups, left=1), aligned(layers, left=2), "(--json prints all of this as one JSON record)"]
    )


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


_ACCURACIES = ("val_top1", "test_top1", "robust_top1")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (JSON output has one type per key)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunPrinter:
    """What ``rayprune run`` prints: a line per search step and a summary table beside the
    unpruned baseline for people; with ``--json``, JSON lines of one schema with scalar values:

    * ``{"event": "step", "step": int, "subnets": int, "best_val_top1": float|null,
      "best_macs": int|null, "method.<name>": float, ...}`` after every search step (``step`` is
      1-based; the method's own step metrics are namespaced ``method.``);
    * ``{"event": "result", "out": str, "method": str, "macs": int, "params": int,
      "macs_ratio": float, "unpruned_macs": int, "val_top1"/"test_top1"/"robust_top1": float,
      "unpruned_test_top1": float (when a teacher measured it)}`` at the end.
    """

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout

    def step(self, step: Any) -> None:
        scored = [s for s in step.subnets if isinstance(s.metrics.get("val_top1"), (int, float))]
        best = max(scored, key=lambda s: s.metrics["val_top1"], default=None)
        row = {
            "event": "step",
            "step": step.step + 1,
            "subnets": len(step.subnets),
            "best_val_top1": None if best is None else float(best.metrics["val_top1"]),
            "best_macs": None if best is None else int(best.macs),
            **{f"method.{k}": v for k, v in _scalars(step.metrics).items()},
        }
        if self.as_json:
            self._emit(json.dumps(row))
            return
        text = f"search step {row['step']}: {row['subnets']} subnet(s)"
        if best is not None:
            text += f", best val_top1 {row['best_val_top1']:.4f} at {row['best_macs'] / 1e6:.3f}M MACs"
        self._emit(text)

    def result(self, out: Path, method: str, result: dict[str, Any]) -> None:
        final, unpruned = result["final"], result.get("unpruned") or {}
        row = {
            "event": "result",
            "out": str(out),
            "method": method,
            "macs": int(final["macs"]),
            "params": int(final["params"]),
            "macs_ratio": final["macs"] / result["unpruned_macs"],
            "unpruned_macs": int(result["unpruned_macs"]),
            **{k: float(final["metrics"][k]) for k in _ACCURACIES if k in final["metrics"]},
            **{f"unpruned_{k}": float(v) for k, v in _scalars(unpruned.get("metrics", {})).items() if k in _ACCURACIES},
        }
        train_step = (final.get("source") or {}).get("train_step")
        if train_step:  # a fallback to the eager loop must be visible, with its reason
            from .engine.captured import StepPlan

            row["train_step"] = StepPlan(**train_step).describe()
        if self.as_json:
            self._emit(json.dumps(row))
        else:
            self._emit(self.summary(row, unpruned.get("params")))

    @staticmethod
    def summary(row: dict[str, Any], unpruned_params: int | None = None) -> str:
        """The result beside the unpruned net as a small table, then where the files are."""
        from .tables import aligned

        def acc(value: Any) -> str:
            return "-" if value is None else f"{value:.4f}"

        header = ["", "MACs", "MACs%", "params", *_ACCURACIES]
        base = [
            "unpruned",
            f"{row['unpruned_macs']:,}",
            "100.0",
            "-" if unpruned_params is None else f"{unpruned_params:,}",
            *(acc(row.get(f"unpruned_{k}")) for k in _ACCURACIES),
        ]
        mine = [
            f"{row['method']} subnet",
            f"{row['macs']:,}",
            f"{100.0 * row['macs_ratio']:.1f}",
            f"{row['params']:,}",
            *(acc(row.get(k)) for k in _ACCURACIES),
        ]
        note = (
            ""
            if "unpruned_test_top1" in row
            else "\n(the unpruned net's accuracy is measured only when a teacher is trained or given)"
        )
        if row.get("train_step"):
            note += f"\nfine-tune steps: {row['train_step']}"
        return (
            f"\n{aligned([header, base, mine], left=1)}{note}\n"
            f"saved to {row['out']}: final/ (spec.json, weights.pt, metrics.json), subnets.jsonl, result.json"
        )

    def _emit(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


#: What :func:`_add_training_args` adds that ``run`` and ``teacher`` pass on as it is, under its own name.
TRAINING_OPTIONS = (
    "model",
    "shortcut",
    "weights",
    "dataset",
    "data_dir",
    "seed",
    "device",
    "train_subset",
    "test_subset",
    "input_size",
)


def _training_options(args: argparse.Namespace) -> dict[str, Any]:
    from . import models

    options = {name: getattr(args, name) for name in TRAINING_OPTIONS}
    if options["model"] is not None and models.is_source(options["model"]):  # a user file, stored absolute
        options["model"] = models.absolute_source(options["model"])
    return {**options, "dataset_options": parse_assignments(args.data_option, "--data-option")}


def cmd_run(args: argparse.Namespace) -> int:
    from .methods import get_method
    from .runner import TrialConfig, run_trial

    method = get_method(args.method)
    hparams = dict(method.smoke) if args.smoke else {}
    hparams.update(parse_assignments(args.set, "--set"))
    user_finetune = parse_assignments(args.finetune, "--finetune")
    # The method's preferred fine-tune (AST: from its inherited weights at a small lr) fills in
    # what the user left unset; a sweep instead gives every method the sweep file's recipe.
    finetune = {**method.finetune_defaults, **user_finetune}
    if args.model is not None:
        from . import models
        from .engine.data import DATASETS

        size = args.input_size or (DATASETS.get(args.dataset).input_size if models.is_source(args.model) else None)
        options = {"shortcut": args.shortcut} if args.shortcut else {}
        method.check_spec(models.full_spec(args.model, input_size=size, **options))
    out = Path(args.out)
    options = dict(
        method=args.method,
        hparams=hparams,
        flops_target=args.flops_target,
        kd_weight=args.kd_weight,
        max_stage_prune=parse_rates(args.max_stage_prune),
        finetune=finetune,
        teacher=args.teacher,
        max_steps=args.max_steps,
        **_training_options(args),
    )
    cfg = validated(TrialConfig, options)
    # With --kd-weight > 0 and no --teacher, run_trial trains one into OUT/teacher, after validating everything.
    teacher_recipe = {**user_finetune, "epochs": args.teacher_epochs} if args.teacher_epochs > 0 else None

    printer = RunPrinter(args.json)
    result = run_trial(
        cfg, out, resume=not args.no_resume, progress=args.progress, on_step=printer.step, teacher_recipe=teacher_recipe
    )
    printer.result(out, args.method, result)
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from .models import subnet_io
    from .runner import train_teacher

    recipe = {**parse_assignments(args.finetune, "--finetune"), "epochs": args.epochs}
    out = train_teacher(out_dir=args.out, recipe=recipe, progress=args.progress, **_training_options(args))
    saved = subnet_io.load(out)
    row = {
        "event": "teacher",
        "out": str(out),
        "macs": int(saved.record["macs"]),
        "params": int(saved.record["params"]),
        **_scalars(saved.metrics),
    }
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"teacher saved to {out}: {row['macs']:,} MACs, {row['params']:,} params"
            + "".join(f", {k} {row[k]:.4f}" for k in _ACCURACIES if k in row)
        )
    return 0


# ---------------------------------------------------------------------------------------------
# sweep / front / pick: the orchestration and tracking layers
# ---------------------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    from .orchestration import cluster
    from .orchestration.config import load_sweep
    from .orchestration.sweep import run_sweep

    space, warning = cluster.resolve_space(args.space)  # a path the user's shell expanded for another machine
    if warning:
        print(warning, file=sys.stderr)
    overrides = {
        "tracking.uri": args.mlflow_uri,
        "tracking.experiment": args.experiment,
        "storage_path": args.storage_path,
    }
    cfg = _on_cluster(load_sweep(space, overrides), args)
    cluster.wait_for_tracking_server(cfg.tracking.uri, args.address)  # right after `ray up` it may be starting
    outcome = run_sweep(cfg, address=args.address, resume=args.resume, num_cpus=args.num_cpus, space=str(space))
    resume = f"rayprune sweep --space {_shown_space(space)} --resume {outcome.sweep_id}"
    if not outcome.complete:
        print(f"The sweep was interrupted; continue it with: {resume}", file=sys.stderr)
        return EXIT_FAILED
    if outcome.failed_trials:
        return fail(
            f"{outcome.failed_trials} of {outcome.num_trials} trials failed (their error.txt is under "
            f"{outcome.experiment_path}); fix the cause, then retry them with: {resume}",
            EXIT_FAILED,
        )
    return 0


def _on_cluster(cfg: SweepConfig, args: argparse.Namespace) -> SweepConfig:
    """``cfg`` with the tracking store and storage path a driver on a cluster uses: outside a
    job's temporary package folder, and the head's server instead of its database (notes on
    stderr say so)."""
    from .orchestration import cluster

    uri, storage, moved = cluster.outside_package_folder(
        cfg.tracking.uri, cfg.storage_path, args.mlflow_uri, args.storage_path
    )
    uri, note = cluster.tracking_uri_on_cluster(uri, args.mlflow_uri, args.address)
    for line in (moved, note):
        if line:
            print(line, file=sys.stderr)
    if (uri, storage) == (cfg.tracking.uri, cfg.storage_path):
        return cfg
    tracking = cfg.tracking.model_copy(update={"uri": uri})
    return cfg.model_copy(update={"tracking": tracking, "storage_path": storage})


def _shown_space(space: Path) -> Path:
    """The sweep file as a resume command names it: relative to a job's package folder, which
    the next ``ray job submit --working-dir`` recreates elsewhere."""
    from .orchestration.cluster import ray_package_folder

    folder = ray_package_folder()
    if folder is not None and space.resolve().is_relative_to(folder):
        return space.resolve().relative_to(folder)
    return space


def cmd_front(args: argparse.Namespace) -> int:
    from .tracking.commands import front

    front(args)
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    from .tracking.commands import pick

    pick(args)
    return 0


def _parsed(
    text: str, convert: Callable[[str], Any], expected: str, valid: Callable[[Any], bool], hint: str = ""
) -> Any:
    """``convert(text)`` if it works and is ``valid``; else argparse's one-line type error."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}{hint}, got {text!r}")
    return value


def _macs_count(text: str) -> float:
    scale = _SUFFIXES.get(text[-1:].upper(), 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def _count(text: str) -> float:
    """A MACs count: a number (4e7) or with a K/M/G suffix (40M)."""
    return _parsed(text, _macs_count, "a positive MACs count like 4e7 or 40M", lambda v: v > 0)


def _fraction(text: str) -> float:
    return _parsed(
        text, float, "a fraction in [0, 1]", lambda v: 0.0 <= v <= 1.0, " (accuracies are fractions, e.g. 0.92)"
    )


def _positive_int(text: str) -> int:
    return _parsed(text, int, "a positive whole number", lambda v: v > 0)


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``rayprune`` parser with every subcommand."""
    p = Parser(prog="rayprune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_inspect(sub)
    _add_run(sub)
    _add_teacher(sub)
    _add_sweep(sub)
    _add_front(sub)
    _add_pick(sub)
    return p


def _command(
    sub: argparse._SubParsersAction[Parser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    description: str | None = None,
) -> Parser:
    """The parser of subcommand ``name``, which ``func`` runs."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(func=func)
    return parser


def _add_inspect(sub: argparse._SubParsersAction[Parser]) -> None:
    i = _command(sub, "inspect", cmd_inspect, "MACs, params, channel groups and per-layer table of a spec")
    i.add_argument("spec", help="path to a spec JSON file")
    i.add_argument(
        "--input-size", type=_positive_int, default=None, help="input resolution (family default if omitted)"
    )
    i.add_argument(
        "--reference", default=None, help="FAMILY:VARIANT to report macs_ratio against, e.g. cifar_resnet:56"
    )
    i.add_argument("--json", action="store_true", help="the whole record as JSON instead of tables")
    i.add_argument("--compact", action="store_true", help="with --json: one-line JSON")


def _add_training_args(q: argparse.ArgumentParser) -> None:
    from .engine.data import DATASETS

    q.add_argument(
        "--model",
        required=True,
        help="FAMILY:VARIANT (e.g. cifar_resnet:56), torchvision:NAME, FILE.py:FACTORY or MODULE:FACTORY",
    )
    q.add_argument("--shortcut", default=None, help="cifar_resnet stride-2 shortcut: option_a|avgpool_conv|conv_bn")
    q.add_argument(
        "--weights",
        default=None,
        help="start the unpruned net from a state_dict FILE, or torchvision:DEFAULT (local torch hub cache only)",
    )
    q.add_argument("--dataset", default="cifar10", help="|".join(DATASETS))
    q.add_argument(
        "--data-dir", default=None, help="dataset folder (else $RAYPRUNE_DATA_DIR, else ~/.cache/rayprune/data)"
    )
    q.add_argument(
        "--data-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dataset setting, repeatable (imagefolder: memory_limit_gb, mean, std, workers, cache_dir)",
    )
    q.add_argument(
        "--input-size",
        type=_positive_int,
        default=None,
        help="input resolution (imagefolder: the side images are fed at, default 224; else the dataset's)",
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None, help="cpu|cuda|cuda:N (default: cuda when available)")
    q.add_argument(
        "--finetune",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training recipe override (engine TrainConfig field), repeatable",
    )
    q.add_argument(
        "--progress", action="store_true", default=None, help="force the progress bars (default: only on a terminal)"
    )
    q.add_argument(
        "--train-subset",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use N class-balanced training images (quick runs)",
    )
    q.add_argument(
        "--test-subset", type=_positive_int, default=None, metavar="N", help="use N class-balanced test images"
    )
    q.add_argument("--json", action="store_true", help="machine-readable JSON lines on stdout instead of tables")


def _add_run(sub: argparse._SubParsersAction[Parser]) -> None:
    from .methods import MODULES

    r = _command(sub, "run", cmd_run, "run one method as a plain-torch trial (no Ray)")
    r.add_argument("--method", required=True, help="|".join(MODULES))
    _add_training_args(r)
    r.add_argument("--flops-target", type=float, required=True, help="target MACs as a fraction of the unpruned net")
    r.add_argument("--kd-weight", type=float, default=0.0, help="distillation weight (0 = efficient mode)")
    r.add_argument("--max-stage-prune", default=None, help="per-stage maximum pruning rates, e.g. 0.5,0.6,0.7")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter, repeatable")
    r.add_argument("--smoke", action="store_true", help="start from the method's seconds-long smoke hyperparameters")
    r.add_argument("--teacher", default=None, help="saved teacher dir (spec.json + weights.pt)")
    r.add_argument(
        "--teacher-epochs", type=int, default=0, help="train a teacher first (when --kd-weight > 0 and no --teacher)"
    )
    r.add_argument("--max-steps", type=_positive_int, default=None, help="stop the search after this many steps")
    r.add_argument("--no-resume", action="store_true", help="ignore a previous state in --out")
    r.add_argument("--out", required=True, help="output directory (resumed if it holds a previous run)")


def _add_teacher(sub: argparse._SubParsersAction[Parser]) -> None:
    t = _command(sub, "teacher", cmd_teacher, "train the unpruned network once and save it as a teacher")
    _add_training_args(t)
    t.add_argument("--epochs", type=_positive_int, required=True)
    t.add_argument("--out", required=True)


def _add_sweep(sub: argparse._SubParsersAction[Parser]) -> None:
    s = _command(
        sub,
        "sweep",
        cmd_sweep,
        "run a sweep on Ray (same as python launch/sweep.py)",
        "Run a sweep file on Ray Tune: every FLOPs target x KD weight cell gets its "
        "trials, Optuna picks the per-stage pruning budgets, MLflow records every subnet "
        "and the Pareto fronts. Same as python launch/sweep.py.",
    )
    s.add_argument("--space", required=True, metavar="FILE", help="sweep file (search_spaces/*.yaml)")
    s.add_argument(
        "--address", default=None, help="Ray cluster to join ('auto' or HOST:PORT; default: start a local Ray)"
    )
    s.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="SWEEP_ID",
        help="continue an interrupted sweep (default: the latest one of this sweep file)",
    )
    s.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (overrides tracking.uri)")
    s.add_argument("--experiment", default=None, help="MLflow experiment (overrides tracking.experiment)")
    s.add_argument(
        "--storage-path",
        default=None,
        help="Tune storage path, local/NFS dir or s3://... (shared by all nodes on a cluster; overrides storage_path)",
    )
    s.add_argument("--num-cpus", type=_positive_int, default=None, help="CPUs of the local Ray (default: all)")


def _add_sweep_lookup(q: argparse.ArgumentParser) -> None:
    q.add_argument("--experiment", required=True, help="MLflow experiment of the sweep")
    q.add_argument(
        "--mlflow-uri",
        default=None,
        help="tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working directory)",
    )
    q.add_argument("--sweep-id", default=None, help="which sweep of the experiment (default: the newest)")


def _add_front(sub: argparse._SubParsersAction[Parser]) -> None:
    f = _command(
        sub,
        "front",
        cmd_front,
        "print the Pareto fronts of a sweep tracked in MLflow",
        "Print the Pareto fronts of a sweep tracked in MLflow.",
    )
    _add_sweep_lookup(f)
    f.add_argument(
        "--init",
        choices=("inherited", "scratch"),
        default=None,
        help="only fine-tuned subnets that started from inherited weights (ast, l1, fpgm) or from "
        "scratch (uniform, tas, sp, random)",
    )


def _add_pick(sub: argparse._SubParsersAction[Parser]) -> None:
    from .tracking.pareto import DEFAULT_MAX_DROP, MODES

    k = _command(
        sub,
        "pick",
        cmd_pick,
        "export the efficient or robust operating point",
        "Export the efficient or robust operating point of a sweep and register it in "
        "the MLflow Model Registry under that alias.",
    )
    _add_sweep_lookup(k)
    k.add_argument(
        "--mode",
        required=True,
        choices=MODES,
        help="efficient: the fewest MACs; robust: the highest robust_top1 (corruption accuracy). "
        "Both only among subnets within --max-drop of the unpruned baseline's test_top1",
    )
    k.add_argument(
        "--max-drop",
        type=_fraction,
        default=DEFAULT_MAX_DROP,
        help="allowed test_top1 drop below the unpruned baseline's, as a fraction (default "
        f"{DEFAULT_MAX_DROP:g} = 1 point; 1 = no limit)",
    )
    k.add_argument(
        "--max-macs", type=_count, default=None, help="only subnets with at most this many MACs (e.g. 4e7 or 40M)"
    )
    k.add_argument(
        "--min-acc", type=_fraction, default=None, help="only subnets with test_top1 >= this (a fraction, e.g. 0.9)"
    )
    k.add_argument(
        "--kd-weight",
        type=_fraction,
        default=None,
        help="choose among the subnets fine-tuned with this KD weight (default: the largest the sweep "
        "has); subnets of different KD weights are never ranked together",
    )
    k.add_argument(
        "--init",
        choices=("inherited", "scratch"),
        default=None,
        help="only subnets whose fine-tune started from inherited weights / from scratch",
    )
    k.add_argument("--out", required=True, type=Path, help="new (or empty) directory to export into")
    k.add_argument(
        "--model-name",
        default=None,
        help="registered model name (default: the experiment name, prefixed with rayprune- unless it starts with it)",
    )
    k.add_argument(
        "--no-register",
        "--dry-run",
        dest="register",
        action="store_false",
        help="export to --out only: nothing is written to the tracking store or the registry",
    )
    k.add_argument(
        "--onnx-exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="auto: torch's dynamo exporter, falling back to the legacy TorchScript one",
    )


# ---------------------------------------------------------------------------------------------
# The error boundary
# ---------------------------------------------------------------------------------------------


def one_line(err: BaseException, command: str | None = None) -> str:
    """Condense an exception (pydantic's multi-line ones included) into one readable line; a
    :class:`RaypruneError` with the flags of ``command`` (:func:`with_flags`)."""
    if isinstance(err, ValidationError):  # only in the bug line: user input is validated into an InputError
        return for_command_line(err) or explain(err)
    if isinstance(err, InputError) and isinstance(err.__cause__, ValidationError):
        flagged = for_command_line(err.__cause__)  # field path or flag, allowed keys/values, "did you mean"
        if flagged is not None:
            return flagged
    text = with_flags(err, command) if isinstance(err, RaypruneError) else str(err)
    return text.strip().replace("\n", " ") or type(err).__name__


#: The flag of the setting a :class:`RaypruneError` starts with (its ``option``), per command.
OPTION_FLAGS = {
    "out_dir": {"run": "--out", "teacher": "--out", "pick": "--out"},
    "kd_weight": {"run": "--kd-weight"},
}
#: The fix of a :class:`RaypruneError` (by its ``hint``) in the flags of each command that has them.
HINTS = {
    "fresh_start": {"run": "delete it (or pass --no-resume) to start that run afresh"},
    "other_settings": {"run": "resume with the same settings, use another --out, or pass --no-resume"},
    "teacher": {"run": "pass --teacher DIR (a saved subnet) or --teacher-epochs N to train one first"},
    "shortcut": {"run": "use --shortcut avgpool_conv or --shortcut conv_bn"},
    "model": {"run": "use e.g. --model cifar_resnet:56 or resnet:50"},
    "data_dir": {
        "run": "give that directory with --data-dir DIR or in RAYPRUNE_DATA_DIR",
        "teacher": "give that directory with --data-dir DIR or in RAYPRUNE_DATA_DIR",
        "sweep": "give that directory as dataset.data_dir in the sweep file or in RAYPRUNE_DATA_DIR",
    },
    "new_out": {"pick": "pass a new --out or remove it"},
    "local_ray": {
        "sweep": "start one with `ray start --head` or `ray up launch/cluster.yaml`, or drop --address to run on a "
        "local Ray"
    },
    "no_resume": {"sweep": "run without --resume to start one"},
}


def with_flags(err: RaypruneError, command: str | None) -> str:
    """``err``'s line as ``command`` shows it: its option named by its flag, its fix by
    :data:`HINTS` (the line as it is where the command has no such flag)."""
    text = str(err)
    fix = HINTS.get(err.hint or "", {}).get(command or "")
    if fix is not None and err.fix:
        text = f"{err.problem}; {fix}"
    flag = OPTION_FLAGS.get(err.option or "", {}).get(command or "")
    if flag is not None and err.option is not None and text.startswith(err.option):
        text = flag + text[len(err.option) :]
    return text


def for_command_line(error: ValidationError) -> str | None:
    """:func:`~rayprune.errors.explain` for the models the ``run``/``teacher`` options fill,
    naming the flags (``--kd-weight``, ``--set KEY``, ``--finetune KEY``) instead of the internal
    models; None for another model."""
    from .engine.train import TrainConfig
    from .methods import MODULES, Budget, get_method
    from .runner import TrialConfig

    if error.title in (TrialConfig.__name__, Budget.__name__):
        root = TrialConfig if error.title == TrialConfig.__name__ else Budget
        return explain(error, root, name=_flag)
    if error.title == TrainConfig.__name__:
        return explain(error, TrainConfig, name=_option_flag("--finetune"))
    if error.title.endswith("Hparams"):
        for method in MODULES:
            try:
                hparams = get_method(method).Hparams
            except Exception:  # a method whose module cannot be imported here
                continue
            if hparams.__name__ == error.title:
                return explain(error, hparams, name=_option_flag("--set"))
    return None


def _option_flag(flag: str) -> Callable[[tuple], str]:
    """A location inside a ``KEY=VALUE`` option as ``--set KEY`` (the flag alone when empty)."""
    return lambda loc: f"{flag} {field_path(loc)}" if loc else flag


def _flag(loc: tuple) -> str:
    """A TrialConfig/Budget location as the ``rayprune run`` flag that sets it."""
    if not loc:
        return ""
    head, rest = loc[0], loc[1:]
    if head == "hparams":
        return _option_flag("--set")(rest)
    if head == "finetune":
        return _option_flag("--finetune")(rest)
    return "--" + str(head).replace("_", "-")


def _task_cause(err: BaseException) -> BaseException | None:
    """The user error inside a Ray task's error (a teacher or fine-tune task given bad input)."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is not None and isinstance(err, ray_exceptions.RayTaskError):
        cause = getattr(err, "cause", None)
        return cause if isinstance(cause, RaypruneError) else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``rayprune`` command; returns its exit status (bad input: one line, 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        return fail("interrupted; re-run the same command to resume")
    except Exception as e:
        if os.environ.get("RAYPRUNE_DEBUG"):
            raise
        command = argv[0] if argv else None
        cause = _task_cause(e)
        if cause is not None:
            return fail(one_line(cause, command))
        if isinstance(e, RaypruneError):
            return fail(one_line(e, command))
        return fail(
            f"internal error, a bug in rayprune ({type(e).__name__}: {one_line(e)}); rerun with "
            "RAYPRUNE_DEBUG=1 to see the traceback, and report it",
            EXIT_FAILED,
        )


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``rayprune sweep`` with ``argv`` (what ``launch/sweep.py`` runs)."""
    return main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
