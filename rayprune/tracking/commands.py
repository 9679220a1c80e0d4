"""``rayprune front`` and ``rayprune pick``: read a sweep's fronts back from MLflow.

:func:`front` prints the unpruned baseline, the per-method search fronts and the final and
robust fronts (per recipe group) as tables, with MACs% and the accuracy drop. :func:`pick`
chooses one fine-tuned subnet (see :func:`~rayprune.tracking.pareto.choose_operating_point`),
exports it (spec.json, weights.pt, model.onnx, model_card.md) and registers it as
``<model-name>@<mode>`` in the MLflow Model Registry as an ONNX model (``mlflow.onnx``:
signature, input example; loads with ``mlflow.pyfunc.load_model``); ``register=False`` only
exports. The export, its signature and its card take the input size the subnet was trained at,
saved with it (see :func:`_load_download`). Both read ``subnets.parquet`` from the sweep's parent
run, so they work from any machine that reaches the tracking server. Their parsers live in
:mod:`rayprune.cli`.

Bad input (unknown experiment, no front yet, unreachable server, impossible limits) raises a
:class:`~rayprune.tracking.TrackingError` naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..models import subnet_io
from . import TrackingError, mlflow_errors
from .mlflow_ui import candidates_link, has_candidates_view, runs_link
from .pareto import baseline_row, choose_operating_point, format_fronts


def default_model_name(experiment: str) -> str:
    """``rayprune-<experiment>``, or the experiment itself when it already starts with rayprune."""
    return experiment if experiment.startswith("rayprune") else f"rayprune-{experiment}"


def _open_sweep(args: argparse.Namespace, write: bool = False) -> tuple[Any, Any, list[dict[str, Any]]]:
    """The client, the sweep's parent run and its rows. Sweeps whose driver died with their runs
    RUNNING are closed as interrupted when the command writes anyway (``write``); otherwise the
    one shown is only reported, on stderr."""
    from .liveness import interrupted_sweeps
    from .lookup import connect, find_experiment, find_sweep_run, sweep_rows

    client = connect(args.mlflow_uri, must_exist=True)
    experiment_id = find_experiment(client, args.experiment)
    run = find_sweep_run(client, experiment_id, args.sweep_id)
    for item in interrupted_sweeps(client, experiment_id, mark=write):
        if item.run_id == run.info.run_id:
            print(
                f"rayprune: note: sweep {item.sweep_id} was interrupted (its driver {item.driver} stopped without "
                f"closing its runs{'; they are now marked KILLED' if write else ''}); its fronts are partial; "
                f"resume it with: {item.resume}",
                file=sys.stderr,
            )
    return client, run, sweep_rows(client, run)


@mlflow_errors()
def front(args: argparse.Namespace) -> None:
    """Print the fronts of the sweep ``args`` names (experiment, mlflow_uri, sweep_id, init)."""
    client, run, rows = _open_sweep(args)
    sweep = run.data.tags.get("rayprune.sweep_id", "?")
    print(f"experiment {args.experiment}, sweep {sweep} (parent run {run.info.run_id}): {len(rows)} subnet records\n")
    print(format_fronts(rows, args.init))
    print("\n" + _browse_line(client, run.info.experiment_id))


def _browse_line(client: Any, experiment_id: str) -> str:
    """Where to see the candidates in MLflow's UI: the sweep's printed link (the saved view), or
    the runs page when no sweep has added the view to this experiment yet."""
    uri = client.tracking_uri
    serve = "" if urlparse(uri).scheme in ("http", "https") else f" (serve it: mlflow ui --backend-store-uri {uri})"
    if has_candidates_view(client.get_experiment(experiment_id).tags):
        return f"the fine-tuned candidates in MLflow's UI{serve}: {candidates_link(uri, experiment_id)}"
    return f"the runs in MLflow's UI{serve}: {runs_link(uri, experiment_id)}"


@mlflow_errors()
def pick(args: argparse.Namespace) -> None:
    """Choose, export and (unless ``args.register`` is false) register an operating point."""
    from ..export import export_subnet
    from .lookup import download_subnet
    from .model_registry import register_choice

    out: Path = args.out.resolve()
    if out.exists() and not out.is_dir():
        raise TrackingError(f"--out {str(out)!r} is a file, not a directory; pass a new directory")
    if out.exists() and any(out.iterdir()):
        raise TrackingError(
            f"output directory {str(out)!r} already exists and is not empty; pass a new --out or remove it"
        )
    client, parent, rows = _open_sweep(args, write=args.register)
    max_drop = None if args.max_drop >= 1.0 else args.max_drop
    row, why = choose_operating_point(
        rows,
        args.mode,
        max_macs=args.max_macs,
        min_acc=args.min_acc,
        max_drop=max_drop,
        kd_weight=args.kd_weight,
        init=args.init,
    )
    model_name = args.model_name or default_model_name(args.experiment)
    base = baseline_row(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Stage beside --out so the final rename is atomic: --out appears complete or not at all.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        saved = _load_download(download_subnet(client, row["artifact_uri"], Path(tmp) / "download"), row, parent)
        input_size = saved.require_input_size()
        source = row.get("source") or {}
        info = {
            "mode": args.mode,
            "selection": why,
            "method": row["method"],
            "dataset": _dataset(parent),
            "flops_target": row.get("flops_target"),
            "kd_weight": row.get("kd_weight"),
            "recipe": row.get("recipe") or source.get("recipe_tag"),
            "init": row.get("init") or source.get("init"),
            "robust_suite": row.get("robust_suite"),
            "experiment": args.experiment,
            "sweep_id": parent.data.tags.get("rayprune.sweep_id"),
            "parent_run_id": parent.info.run_id,
            "source_run_id": row.get("run_id"),
            "trial_id": row["trial_id"],
            "record": f"{row['kind']} step {row['step']}",
            "weights": row["artifact_uri"],
            "registered_model": f"{model_name}@{args.mode}" if args.register else None,
        }
        preprocessing = _preprocessing(row, base)
        staged = export_subnet(
            saved.spec,
            saved.state_dict,
            {**saved.metrics, **row["metrics"]},
            Path(tmp) / "export",
            input_size=input_size,
            info=info,
            exporter=args.onnx_exporter,
            baseline=base,
            preprocessing=preprocessing,
        )
        version = (
            register_choice(client, parent, model_name, args.mode, staged, row, why, input_size, preprocessing)
            if args.register
            else None
        )
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staged, out)
    _print_choice(args.mode, row, why, out, model_name, None if version is None else version.version, base)


def _load_download(folder: Path, row: dict[str, Any], parent: Any) -> subnet_io.SavedSubnet:
    """The downloaded subnet with the input size it was trained at: the saved one, else (a
    subnet saved before sizes were) its sweep's (:func:`_sweep_input_size`), else its spec's hint;
    refused when none is known, never guessed from the family."""
    try:
        saved = subnet_io.load(folder, default_input_size=_sweep_input_size(row, parent))
    except subnet_io.NotASubnetError as e:
        raise TrackingError(f"the picked record's artifacts are incomplete: {e}") from None
    if saved.input_size is None:
        raise TrackingError(
            f"the picked subnet (trial {row['trial_id']}, {row['kind']}) records no input size and its sweep names "
            "neither an input_size nor a known dataset; run the sweep again with this rayprune, whose saved "
            "subnets record the size they were trained at"
        )
    return saved


def _sweep_input_size(row: dict[str, Any], parent: Any) -> int | None:
    """The size a sweep trains and measures at: its ``input_size`` setting, else its dataset's
    (as the record's preprocessing measured it, else as the dataset registry has it)."""
    from ..engine.data import DATASETS

    setting = parent.data.params.get("input_size")
    if setting is not None and setting.isdigit():
        return int(setting)
    measured = ((row.get("source") or {}).get("preprocessing") or {}).get("input_size")
    if measured:
        return int(measured)
    dataset = _dataset(parent)
    return DATASETS.get(dataset).input_size if dataset is not None and dataset in DATASETS else None


def _dataset(parent: Any) -> str | None:
    return parent.data.params.get("dataset.name") or parent.data.params.get("dataset")


def _preprocessing(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any] | None:
    """The exact input preprocessing the subnet was trained with (stored in its record)."""
    return (row.get("source") or {}).get("preprocessing") or ((base or {}).get("source") or {}).get("preprocessing")


def _print_choice(
    mode: str,
    row: dict[str, Any],
    why: str,
    out: Path,
    model_name: str,
    version: str | None,
    base: dict[str, Any] | None = None,
) -> None:
    metrics = ", ".join(f"{k} {row['metrics'][k]:.4f}" for k in ("test_top1", "robust_top1") if k in row["metrics"])
    vs = ""
    if base is not None and base["metrics"].get("test_top1") is not None and "test_top1" in row["metrics"]:
        vs = (
            f" (baseline test_top1 {base['metrics']['test_top1']:.4f}, drop "
            f"{base['metrics']['test_top1'] - row['metrics']['test_top1']:+.4f}; "
            f"{100.0 * row['macs'] / base['macs']:.1f}% of its MACs)"
        )
    print(
        f"picked {mode}: {row['method']} (trial {row['trial_id']}, {row['kind']}), {row['macs']:,} MACs, "
        f"{row['params']:,} params, {metrics}{vs}"
    )
    print(f"  selection: {why}")
    print(f"exported to {out} (spec.json, weights.pt, model.onnx, model_card.md)")
    if version is None:
        print("not registered (--no-register): nothing was written to the tracking store")
    else:
        print(
            f"registered {model_name} version {version} as @{mode} (ONNX flavor): "
            f"mlflow.pyfunc.load_model('models:/{model_name}@{mode}')"
        )
