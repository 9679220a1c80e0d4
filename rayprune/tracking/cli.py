"""``rayprune front`` and ``rayprune pick``: read a sweep's fronts back from MLflow.

``rayprune front --experiment NAME`` prints the unpruned baseline, the per-method search fronts
and the final and robust fronts (per recipe group) as tables, with MACs% and the accuracy drop.
``rayprune pick --experiment NAME --mode efficient|robust --out DIR`` chooses one fine-tuned
subnet (see :func:`~rayprune.tracking.pareto.choose_operating_point`), exports it (spec.json,
weights.pt, model.onnx, model_card.md) and registers it as ``<model-name>@<mode>`` in the
MLflow Model Registry as an ONNX model (``mlflow.onnx``: signature, input example; loads with
``mlflow.pyfunc.load_model``). ``--no-register`` only exports. Both read ``subnets.parquet``
from the sweep's parent run, so they work from any machine that reaches the tracking server.

Bad input (unknown experiment, no front yet, unreachable server, impossible limits) prints one
``rayprune: error: ...`` line and returns 2. mlflow is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from ..models import SpecError
from . import TrackingError
from .pareto import DEFAULT_MAX_DROP, MODES, baseline_row, choose_operating_point, format_fronts

EXIT_BAD_INPUT = 2
_SUFFIXES = {"K": 1e3, "M": 1e6, "G": 1e9}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become one ``rayprune: error:`` line (like every other error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise TrackingError(f"{message} (see {self.prog} --help)")


def front_main(argv: Sequence[str] | None = None) -> int:
    """``rayprune front``: print a sweep's Pareto fronts. Returns the exit code."""
    parser = _Parser(prog="rayprune front", description="Print the Pareto fronts of a sweep tracked in MLflow.")
    _add_sweep_args(parser)
    parser.add_argument("--init", choices=("inherited", "scratch"), default=None,
                        help="only fine-tuned subnets that started from inherited weights (ast, l1, fpgm) or from "
                             "scratch (uniform, tas, sp, random)")
    return _guarded(lambda: _front(parser.parse_args(argv)))


def pick_main(argv: Sequence[str] | None = None) -> int:
    """``rayprune pick``: export and register an operating point. Returns the exit code."""
    parser = _Parser(prog="rayprune pick", description="Export the efficient or robust operating point of a sweep "
                     "and register it in the MLflow Model Registry under that alias.")
    _add_sweep_args(parser)
    parser.add_argument("--mode", required=True, choices=MODES,
                        help="efficient: the fewest MACs; robust: the highest robust_top1 (corruption accuracy). "
                             "Both only among subnets within --max-drop of the unpruned baseline's test_top1")
    parser.add_argument("--max-drop", type=_fraction, default=DEFAULT_MAX_DROP,
                        help="allowed test_top1 drop below the unpruned baseline's, as a fraction (default "
                             f"{DEFAULT_MAX_DROP:g} = 1 point; 1 = no limit)")
    parser.add_argument("--max-macs", type=_count, default=None, help="only subnets with at most this many MACs "
                        "(e.g. 4e7 or 40M)")
    parser.add_argument("--min-acc", type=_fraction, default=None, help="only subnets with test_top1 >= this "
                        "(a fraction, e.g. 0.9)")
    parser.add_argument("--kd-weight", type=_fraction, default=None,
                        help="choose among the subnets fine-tuned with this KD weight (default: the largest the "
                             "sweep has); subnets of different KD weights are never ranked together")
    parser.add_argument("--init", choices=("inherited", "scratch"), default=None,
                        help="only subnets whose fine-tune started from inherited weights / from scratch")
    parser.add_argument("--out", required=True, type=Path, help="new (or empty) directory to export into")
    parser.add_argument("--model-name", default=None, help="registered model name (default: the experiment name, "
                        "prefixed with rayprune- unless it starts with it)")
    parser.add_argument("--no-register", "--dry-run", dest="register", action="store_false",
                        help="export to --out only: nothing is written to the tracking store or the registry")
    parser.add_argument("--onnx-exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                        help="auto: torch's dynamo exporter, falling back to the legacy TorchScript one")
    return _guarded(lambda: _pick(parser.parse_args(argv)))


def default_model_name(experiment: str) -> str:
    """``rayprune-<experiment>``, or the experiment itself when it already starts with rayprune."""
    return experiment if experiment.startswith("rayprune") else f"rayprune-{experiment}"


def _add_sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the sweep")
    parser.add_argument("--mlflow-uri", default=None, help="tracking URI (default $MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db in the working directory)")
    parser.add_argument("--sweep-id", default=None, help="which sweep of the experiment (default: the newest)")


def _guarded(command: Callable[[], None]) -> int:
    from mlflow.exceptions import MlflowException

    try:
        command()
    except (TrackingError, SpecError, ValueError, MlflowException) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rayprune: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _open_sweep(args: argparse.Namespace) -> tuple[Any, Any, list[dict[str, Any]]]:
    from .lookup import connect, find_experiment, find_sweep_run, sweep_rows

    client = connect(args.mlflow_uri, must_exist=True)
    run = find_sweep_run(client, find_experiment(client, args.experiment), args.sweep_id)
    return client, run, sweep_rows(client, run)


def _front(args: argparse.Namespace) -> None:
    _, run, rows = _open_sweep(args)
    sweep = run.data.tags.get("rayprune.sweep_id", "?")
    print(f"experiment {args.experiment}, sweep {sweep} (parent run {run.info.run_id}): {len(rows)} subnet records\n")
    print(format_fronts(rows, args.init))


def _pick(args: argparse.Namespace) -> None:
    from .export import export_subnet, infer_input_size, load_subnet_dir
    from .lookup import download_subnet
    from .model_registry import register_choice

    out: Path = args.out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrackingError(f"output directory {str(out)!r} already exists and is not empty; pass a new --out "
                            "or remove it")
    client, parent, rows = _open_sweep(args)
    max_drop = None if args.max_drop >= 1.0 else args.max_drop
    row, why = choose_operating_point(rows, args.mode, max_macs=args.max_macs, min_acc=args.min_acc,
                                      max_drop=max_drop, kd_weight=args.kd_weight, init=args.init)
    model_name = args.model_name or default_model_name(args.experiment)
    base = baseline_row(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Stage beside --out so the final rename is atomic: --out appears complete or not at all.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        spec, state, saved = load_subnet_dir(download_subnet(client, row["artifact_uri"], Path(tmp) / "download"))
        source = row.get("source") or {}
        info = {"mode": args.mode, "selection": why, "method": row["method"], "dataset": _dataset(parent),
                "flops_target": row.get("flops_target"), "kd_weight": row.get("kd_weight"),
                "recipe": row.get("recipe") or source.get("recipe_tag"), "init": row.get("init") or source.get("init"),
                "robust_suite": row.get("robust_suite"), "experiment": args.experiment,
                "sweep_id": parent.data.tags.get("rayprune.sweep_id"), "parent_run_id": parent.info.run_id,
                "source_run_id": row.get("run_id"), "trial_id": row["trial_id"],
                "record": f"{row['kind']} step {row['step']}", "weights": row["artifact_uri"],
                "registered_model": f"{model_name}@{args.mode}" if args.register else None}
        staged = export_subnet(spec, state, {**saved, **row["metrics"]}, Path(tmp) / "export",
                               input_size=infer_input_size(spec, row["macs"]), info=info, exporter=args.onnx_exporter,
                               baseline=base, preprocessing=_preprocessing(row, base))
        version = register_choice(client, parent, model_name, args.mode, staged, row, why) if args.register else None
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staged, out)
    _print_choice(args.mode, row, why, out, model_name, None if version is None else version.version, base)


def _dataset(parent: Any) -> str | None:
    return parent.data.params.get("dataset.name") or parent.data.params.get("dataset")


def _preprocessing(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any] | None:
    """The exact input preprocessing the subnet was trained with (stored in its record)."""
    return (row.get("source") or {}).get("preprocessing") or ((base or {}).get("source") or {}).get("preprocessing")


def _print_choice(mode: str, row: dict[str, Any], why: str, out: Path, model_name: str, version: str | None,
                  base: dict[str, Any] | None = None) -> None:
    metrics = ", ".join(f"{k} {row['metrics'][k]:.4f}" for k in ("test_top1", "robust_top1") if k in row["metrics"])
    vs = ""
    if base is not None and base["metrics"].get("test_top1") is not None and "test_top1" in row["metrics"]:
        vs = (f" (baseline test_top1 {base['metrics']['test_top1']:.4f}, drop "
              f"{base['metrics']['test_top1'] - row['metrics']['test_top1']:+.4f}; "
              f"{100.0 * row['macs'] / base['macs']:.1f}% of its MACs)")
    print(f"picked {mode}: {row['method']} (trial {row['trial_id']}, {row['kind']}), {row['macs']:,} MACs, "
          f"{row['params']:,} params, {metrics}{vs}")
    print(f"  selection: {why}")
    print(f"exported to {out} (spec.json, weights.pt, model.onnx, model_card.md)")
    if version is None:
        print("not registered (--no-register): nothing was written to the tracking store")
    else:
        print(f"registered {model_name} version {version} as @{mode} (ONNX flavor): "
              f"mlflow.pyfunc.load_model('models:/{model_name}@{mode}')")


def _count(text: str) -> float:
    """A MACs count: a number (4e7) or with a K/M/G suffix (40M)."""
    scale = _SUFFIXES.get(text[-1:].upper(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a MACs count like 4e7 or 40M, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive MACs count, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] (accuracies are fractions, e.g. 0.92), "
                                         f"got {text!r}")
    return value
