"""One sha256 digest of what a sweep computed, to show that a refactor leaves the behaviour unchanged.

    python bench/record_digest.py [--space FILE] [--show] [--keep DIR | --from DIR]

Runs ``rayprune sweep --space FILE`` (default ``search_spaces/quickstart.yaml``, what ``make quickstart``
runs) in a fresh working directory, so the user's ``mlflow.db`` and ``ray_results`` are never touched, then
reads the sweep's records and prints the sha256 of one canonical JSON document (``--show``: the document too,
as ``{"digest": ..., "record": ...}``; the digest is over ``json.dumps(record, indent=1, sort_keys=True)``).
``--keep DIR`` runs the sweep in DIR (new or empty) and keeps it; ``--from DIR`` digests a finished sweep
directory without running one. Run with ``PYTHONPATH`` naming the checkout under test.

What the document holds (every value rounded to 6 significant digits; NaN/inf as strings):

* ``subnets``: every row of the driver's ``subnets.parquet`` (``<storage>/<sweep id>/rayprune/``), keyed
  ``<trial>/<kind>/<step>/<spec hash>``: method, cell (flops_target, kd_weight), macs, params, the promoted
  metric columns, recipe, recipe_hash, init, robust_suite, and the ``metrics`` and ``source`` JSON.
* ``specs``: each subnet spec, by spec hash.
* ``runs``: every MLflow run of the sweep's sqlite store (``mlflow.db``), keyed by a stable name (``sweep``,
  the trial's name below, ``finetune:<cell>``): status, run name, params (parsed as JSON), tags, and metrics:
  the child runs' full history as sorted ``[step, value]`` pairs; the parent run's latest values only.
* ``artifacts``: the parent run's published fronts (``pareto/front_*.json``, members sorted by key) and its
  ``sweep/resolved_sweep.json``.
* ``experiments``: names and tags.

A Tune trial is named ``<method>_f<target>_kd<weight>#<optuna number>`` (the cell and the trial's number in
the cell's seeded Optuna study, which fixes its budget and seed); every Tune trial id, MLflow run id, the sweep
id and the working directory is rewritten to a stable name wherever it appears (also inside strings).

Dropped, because they differ between two identical runs or name the environment rather than the behaviour:
run/trial/sweep ids and artifact URIs (rewritten, or the ``run_id``/``artifact_uri`` columns dropped), start
and end times, every key containing ``latency`` (wall-clock measurements), the parent run's metric history
(the fronts are also published while trials finish, at most every 300 s, so how many were published and at
which step is timing), the ``mlflow.*`` tags (MLflow's bookkeeping: user, source, parent link, run name
(kept as ``name``), and ``loggedArtifacts``, whose order follows which front existed at the first publish),
the driver's ``rayprune.driver`` (host:pid), ``rayprune.heartbeat``, ``rayprune.space`` (a path) and
``rayprune.sweep_id`` tags, ``git_sha`` and the ``version.*`` tags (rayprune's and the libraries'), the
``sweep_id`` column, the plot ``pareto.png`` and the saved weights (their numbers are in the metrics), and the
trials' ``subnets.json`` tables (the same rows as ``subnets.parquet``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = ROOT / "search_spaces" / "quickstart.yaml"
DIGITS = 6  # significant digits kept of every float
DROPPED_KEY = re.compile(r"latency")  # wall-clock measurements, at any depth
DROPPED_COLUMNS = {"sweep_id", "trial_id", "run_id", "artifact_uri", "spec"}  # ids, URIs; spec goes to specs
DROPPED_TAGS = re.compile(r"^(mlflow\.|version\.|git_sha$|rayprune\.(driver|heartbeat|space|sweep_id)$)")


def run_sweep(space: Path, workdir: Path) -> float:
    """Run the sweep in ``workdir`` (its output goes to ``sweep.log`` there); returns its wall time."""
    found = importlib.util.find_spec("rayprune")  # what the sweep will import: set PYTHONPATH to choose
    print(f"record_digest: rayprune from {found and found.origin}", file=sys.stderr)
    start = time.monotonic()
    with open(workdir / "sweep.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "rayprune.cli", "sweep", "--space", str(space.resolve())],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        sys.exit(f"record_digest: the sweep failed (exit {done.returncode}); see {workdir / 'sweep.log'}")
    return time.monotonic() - start


def canonical(value: Any) -> Any:
    """``value`` with floats rounded, NaN/inf as strings and the dropped keys removed (recursively)."""
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else float(f"{value:.{DIGITS}g}")
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items() if not DROPPED_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def parsed(text: str) -> Any:
    """An MLflow param or tag value: JSON when it parses (numbers, lists, null), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class Renamer:
    """Rewrites ids and paths, wherever they occur in a string, to stable names."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        ids = sorted(names, key=len, reverse=True)  # a path before the paths it contains
        self.pattern = re.compile("|".join(rf"(?<![0-9a-f]){re.escape(i)}(?![0-9a-f])" for i in ids) or "(?!)")

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.pattern.sub(lambda m: self.names[m.group(0)], value)
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


def run_key(run: Any) -> str:
    """A run's stable name: ``sweep``, the trial's ``<cell>#<optuna number>``, ``finetune:<cell>``."""
    tags, params = run.data.tags, run.data.params
    role = tags.get("rayprune.role")
    if role == "trial":
        cell = f"{params['method']}_f{float(params['flops_target']):g}_kd{float(params['kd_weight']):g}"
        return f"{cell}#{params['optuna_number']}"
    if role == "finetune":
        return f"finetune:{tags['rayprune.member_key']}"
    return str(role)


def load_runs(client: MlflowClient) -> list[Any]:
    """Every run of every experiment in the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=50_000)


def run_record(client: MlflowClient, run: Any, rename: Renamer) -> dict[str, Any]:
    """A run's status, name, params, kept tags and metrics (see the module docstring)."""
    if run.data.tags.get("rayprune.role") == "sweep":
        metrics: dict[str, Any] = dict(run.data.metrics)  # latest values: the history is publish timing
    else:
        metrics = {
            name: sorted([m.step, m.value] for m in client.get_metric_history(run.info.run_id, name))
            for name in run.data.metrics
        }
    return rename(
        {
            "status": run.info.status,
            "name": run.info.run_name,
            "params": {k: parsed(rename(v)) for k, v in run.data.params.items()},
            "tags": {k: parsed(rename(v)) for k, v in run.data.tags.items() if not DROPPED_TAGS.match(k)},
            "metrics": metrics,
        }
    )


def subnet_rows(workdir: Path, rename: Renamer) -> tuple[dict[str, Any], dict[str, Any]]:
    """``subnets.parquet``'s rows by stable key, and the specs by hash."""
    files = [p for p in workdir.rglob("subnets.parquet") if "mlartifacts" not in p.parts]
    if len(files) != 1:
        sys.exit(f"record_digest: expected one subnets.parquet under {workdir}, found {len(files)}")
    rows, specs = {}, {}
    for row in pq.read_table(files[0]).to_pylist():
        row = {k: parsed(v) if k in ("spec", "metrics", "source") else v for k, v in row.items()}
        key = rename(f"{row['trial_id']}/{row['kind']}/{row['step']}/{row['spec_hash']}")
        if key in rows:
            sys.exit(f"record_digest: two subnets.parquet rows have the key {key}")
        specs[row["spec_hash"]] = row["spec"]
        rows[key] = rename({k: v for k, v in row.items() if k not in DROPPED_COLUMNS})
    return rows, specs


def parent_artifacts(artifact_dir: Path, rename: Renamer) -> dict[str, Any]:
    """The parent run's fronts (members sorted by key) and resolved sweep file."""
    out: dict[str, Any] = {
        "sweep/resolved_sweep.json": json.loads((artifact_dir / "sweep/resolved_sweep.json").read_text())
    }
    for path in sorted((artifact_dir / "pareto").glob("front_*.json")):
        table = json.loads(path.read_text())
        members = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
        members = [{k: v for k, v in m.items() if k not in ("artifact_uri", "spec")} for m in members]
        out[f"pareto/{path.name}"] = sorted(rename(members), key=lambda m: m["key"])
    return rename(out)


def record(workdir: Path) -> dict[str, Any]:
    """The canonical record of the finished sweep in ``workdir`` (see the module docstring)."""
    workdir = workdir.resolve()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = load_runs(client)
    parents = [r for r in runs if r.data.tags.get("rayprune.role") == "sweep"]
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        sys.exit(f"record_digest: {workdir} holds {len(parents)} sweep(s), not one finished sweep")
    parent = parents[0]
    experiments = client.search_experiments()
    origin = {str(Path(e.artifact_location).parent) for e in experiments if e.name != "Default"}  # before a move
    names = {r.info.run_id: run_key(r) for r in runs}
    names.update(
        {
            r.data.tags["rayprune.trial_id"]: run_key(r)
            for r in runs
            if "rayprune.trial_id" in r.data.tags and r.data.tags.get("rayprune.role") == "trial"
        }
    )
    names.update({p: "<workdir>" for p in origin | {str(workdir)}})
    names[parent.data.tags["rayprune.sweep_id"]] = "<sweep_id>"
    rename = Renamer(names)
    keyed = {names[r.info.run_id]: r for r in runs}
    if len(keyed) != len(runs):
        sys.exit("record_digest: two runs have the same stable name")
    subnets, specs = subnet_rows(workdir, rename)
    artifact_dir = workdir / "mlartifacts" / parent.info.run_id / "artifacts"
    return canonical(
        {
            "experiments": {e.name: e.tags for e in experiments},
            "runs": {key: run_record(client, run, rename) for key, run in keyed.items()},
            "subnets": subnets,
            "specs": specs,
            "artifacts": parent_artifacts(artifact_dir, rename),
        }
    )


def text_of(doc: dict[str, Any]) -> str:
    """The canonical text of ``doc``: what is hashed, and what ``--show`` prints."""
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="sweep file (default: the quickstart)")
    p.add_argument("--show", action="store_true", help="print the hashed record too, as JSON")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--keep", type=Path, metavar="DIR", help="run the sweep in DIR (new or empty) and keep it")
    where.add_argument("--from", dest="source", type=Path, metavar="DIR", help="digest this finished sweep dir")
    args = p.parse_args()
    if args.source is not None:
        doc = record(args.source)
    else:
        if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
            sys.exit(f"record_digest: --keep {args.keep} is not empty")
        workdir = args.keep or Path(tempfile.mkdtemp(prefix="rayprune-digest-"))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            print(f"record_digest: the sweep took {run_sweep(args.space, workdir):.0f} s in {workdir}", file=sys.stderr)
            doc = record(workdir)
        finally:
            if args.keep is None:
                shutil.rmtree(workdir, ignore_errors=True)
    digest = hashlib.sha256(text_of(doc).encode()).hexdigest()
    print(text_of({"digest": digest, "record": doc}) if args.show else digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
