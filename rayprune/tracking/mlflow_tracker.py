"""MLflow tracking of a sweep: one parent run, one child run per trial, every subnet recorded.

Only the sweep *driver* writes (trials never touch MLflow), so the default SQLite store has a
single writer and never locks. Layout in MLflow:

* **parent run** (tags ``rayprune.role=sweep``, ``rayprune.sweep_id``): the resolved sweep file
  (``sweep/resolved_sweep.json``), seed and top-level config values as params, git SHA and
  library versions as tags, the unpruned baseline's metrics (``unpruned_*``); after each
  :meth:`SweepTracker.update_front` (the sweep's end, and a resume) the fronts as tables
  (``pareto/front_<kind>_<group>.json``), the plot ``pareto/pareto.png`` and the whole registry
  ``subnets.parquet``, plus ``front_size/...`` and per-cell ``cells/...`` metrics.
* **trial runs** (``mlflow.parentRunId`` = parent, ``rayprune.role=trial``): params, per-step
  metrics, the final metrics, the final subnet's files under ``subnet/`` and the trial's subnet
  records as one table ``subnets.json``. Subnets are *not* runs: a sweep evaluates thousands
  and the UI pages runs by about a hundred. Tags ``rayprune.is_pareto[_final|_robust]`` mark
  trials owning a front member.
* **fine-tune runs** (``rayprune.role=finetune``, named ``finetune-<cell>``): one per grid cell,
  its chosen subnet fine-tuned with the sweep's final recipe, with ``macs``, ``macs_pct``,
  ``test_top1``, ``robust_top1`` and ``latency_ms`` as metrics: the equally-treated candidates,
  so MLflow's own table and chart views show the final front.

Everything is idempotent on resume: the parent is found by its sweep-id tag, trial runs by
their trial-id tag, records are de-duplicated by the Parquet store key, per-step metrics are
skipped for steps at or below the run's ``rayprune.last_step`` tag, and artifacts overwrite.
"""

from __future__ import annotations

import json
import posixpath
import subprocess
import tempfile
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from . import TrackingError
from .liveness import STATUS_TAG, Heartbeat, clear_note, driver_tags, interrupted_sweeps, mark_parent, resume_command
from .lookup import PARENT_TAG, ROLE_TAG, SUBNETS_ARTIFACT, SWEEP_TAG, connect, find_sweep_run
from .pareto import baseline_row, compute_fronts, format_fronts, front_kind, front_pool, hypervolume_2d
from .plots import plot_fronts
from .store import SubnetStore, record_row, row_key

TRIAL_TAG = "rayprune.trial_id"
MEMBER_TAG = "rayprune.member_key"
LAST_STEP_TAG = "rayprune.last_step"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # what mlflow.log_table sets: the UI's table viewer
# MLflow 3's UI opens an experiment without this tag in GenAI (traces) mode; ours holds model runs.
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}
FRONT_TAGS = {
    "search": "rayprune.is_pareto",
    "final": "rayprune.is_pareto_final",
    "robust": "rayprune.is_pareto_robust",
}  # by front kind (pareto.FRONT_KINDS)
SUBNET_DIR = "subnet"  # artifact path of a run's saved subnet (spec.json, weights.pt, metrics.json)
VERSIONED = ("torch", "ray", "optuna", "mlflow", "rayprune")
RUN_STATUSES = {
    "FINISHED": "FINISHED",
    "COMPLETED": "FINISHED",
    "TERMINATED": "FINISHED",
    "FAILED": "FAILED",
    "ERROR": "FAILED",
    "KILLED": "KILLED",
    "STOPPED": "KILLED",
}
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
COMPACT_EVERY_S = 30.0  # how often at most the driver rewrites subnets.parquet from its journal
#: How stale, at most, a running (or killed) sweep's fronts and ``subnets.parquet`` in MLflow may
#: get: the first finished trial publishes them at once, later ones when this much time has passed.
PUBLISH_EVERY_S = 300.0


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a sweep's results depend on (without importing them)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_sha() -> str | None:
    """The commit of the rayprune checkout, when it is a git working tree."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted MLflow params (``hparams.lr``), values as strings."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_MAX_PARAM_CHARS]
    return out


def _numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _run_status(status: str) -> str:
    try:
        return RUN_STATUSES[status.upper()]
    except KeyError:
        raise ValueError(f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}") from None


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A store row flattened for an MLflow table (metrics as columns, spec as JSON text)."""
    flat = {
        "key": row_key(row),
        **{
            k: row.get(k)
            for k in (
                "trial_id",
                "kind",
                "step",
                "method",
                "flops_target",
                "kd_weight",
                "recipe",
                "init",
                "macs",
                "params",
            )
        },
    }
    flat.update(row["metrics"])
    flat.update(spec_hash=row["spec_hash"], artifact_uri=row.get("artifact_uri"), spec=json.dumps(row["spec"]))
    return flat


# --------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------


class SweepTracker:
    """The sweep driver's single writer to MLflow and ``subnets.parquet``.

    ``tracking_uri`` None means ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the
    working directory; ``workdir`` holds ``subnets.parquet``. An unreachable server raises
    :class:`TrackingError` within seconds.
    """

    def __init__(
        self, tracking_uri: str | None = None, experiment: str = "rayprune", workdir: str | Path = "."
    ) -> None:
        self.client = connect(tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        self.experiment = experiment
        self.experiment_id = self._experiment_id(experiment)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Journaled, folded into the Parquet file at most every COMPACT_EVERY_S and whenever the
        # fronts are written: a rewrite per reported step costs O(records^2) over a sweep.
        self.store = SubnetStore(self.workdir / SUBNETS_ARTIFACT, compact_every_s=COMPACT_EVERY_S)
        self.sweep_id: str | None = None
        self.parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._member_runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._tags: dict[str, dict[str, str]] = {}  # run id -> front tags as last set
        self._reattached: set[str] = set()
        self._tables: set[tuple[str, str]] = set()  # (run id, artifact file) registered as tables
        self._created: set[str] = set()  # runs this tracker created (their tags are known: none yet)
        self._cells: dict[str, dict[str, float]] = {}  # trial id -> {"flops_target", "kd_weight"}
        self._noted: set[str] = set()  # cells already reported as "budgets do not bind"
        self._published_at: float | None = None  # time.monotonic() of the last update_front
        self._heartbeat: Heartbeat | None = None  # while a sweep is open

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(
                name, artifact_location=self._artifact_location(), tags=EXPERIMENT_KIND_TAGS
            )
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"experiment {name!r} is deleted; restore it (mlflow experiments restore) or pass another --experiment"
            )
        return experiment.experiment_id

    def _artifact_location(self) -> str | None:
        # For SQLite, MLflow's default artifact root is ./mlruns of whatever directory the
        # process runs in; pin it beside the database so every process finds the files.
        if self.tracking_uri.startswith("sqlite:///"):
            return str(Path(self.tracking_uri[len("sqlite:///") :]).parent / "mlartifacts")
        return None  # a server decides (--artifacts-destination)

    # -- sweep ------------------------------------------------------------------------------------
    def start_sweep(self, sweep_id: str, resolved_config: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """Open (or, on resume, reopen) the parent run of ``sweep_id``; returns its run id. First
        closes, as interrupted, the runs that dead drivers left RUNNING in the experiment; then
        records this driver on the parent run and keeps its heartbeat (:mod:`.liveness`)."""
        self.sweep_id = sweep_id
        interrupted_sweeps(self.client, self.experiment_id, mark=True)
        parent = self._existing_parent(sweep_id)
        if parent is None:
            run = self.client.create_run(
                self.experiment_id, run_name=sweep_id, tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep_id}
            )
            self.parent_run_id, logged = run.info.run_id, {}
        else:
            self.parent_run_id, logged = parent.info.run_id, parent.data.params
            self.client.update_run(self.parent_run_id, status="RUNNING")
            clear_note(self.client, parent)
        params = {
            "sweep_id": sweep_id,
            **{k: v for k, v in resolved_config.items() if isinstance(v, (str, int, float, bool)) or v is None},
        }
        for section in ("dataset", "grid"):  # small sections the UI and `pick` want as params (dataset.name)
            if isinstance(resolved_config.get(section), dict):
                params[section] = resolved_config[section]
        self._log_new_params(self.parent_run_id, flatten_params(params), logged)
        run_tags = {**(tags or {}), **driver_tags(), **{f"version.{k}": v for k, v in library_versions().items()}}
        self._resume = resume_command({**run_tags, SWEEP_TAG: sweep_id})
        sha = git_sha()
        if sha:
            run_tags["git_sha"] = sha
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in run_tags.items()])
        self.client.log_dict(
            self.parent_run_id, json.loads(json.dumps(resolved_config, default=str)), "sweep/resolved_sweep.json"
        )
        if parent is not None:
            self._reattach_children()
            self._restore_store()
        self._heartbeat = Heartbeat(self.tracking_uri, self.parent_run_id)
        return self.parent_run_id

    def _existing_parent(self, sweep_id: str) -> Any | None:
        try:
            return find_sweep_run(self.client, self.experiment_id, sweep_id)
        except TrackingError:
            return None

    def _reattach_children(self) -> None:
        """Rebuild the trial/fine-tune run maps of a resumed sweep from the runs' tags."""
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                max_results=1000,
                page_token=token,
            )
            for run in page:
                tags, run_id = run.data.tags, run.info.run_id
                if tags.get(ROLE_TAG) == "trial":
                    self._trial_runs[tags[TRIAL_TAG]] = run_id
                    self._last_step[tags[TRIAL_TAG]] = int(tags.get(LAST_STEP_TAG, -1))
                    self._remember_cell(tags[TRIAL_TAG], run.data.params)
                elif tags.get(ROLE_TAG) == "finetune":
                    self._member_runs[tags[MEMBER_TAG]] = run_id
                self._tags[run_id] = {t: tags[t] for t in FRONT_TAGS.values() if t in tags}
            token = page.token
            if not token:
                return

    def _restore_store(self) -> None:
        """A resumed driver on another machine has no local registry: seed it from the copy
        last logged to the parent run (the sweep driver replays the steps reported since from
        Tune's results: resumed trials continue after their last checkpoint, never re-report)."""
        if len(self.store) or SUBNETS_ARTIFACT not in {f.path for f in self.client.list_artifacts(self.parent_run_id)}:
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = self.client.download_artifacts(self.parent_run_id, SUBNETS_ARTIFACT, tmp)
            self.store.add(SubnetStore(local).rows())

    def log_unpruned(self, record: dict[str, Any]) -> None:
        """Record the unpruned baseline (``SubnetRecord.to_dict()``-like, with test_top1,
        robust_top1 and latency): the reference of MACs%, of the accuracy drop and of ``pick``'s
        --max-drop; logged on the parent run as ``unpruned_*`` metrics."""
        self._require_sweep()
        row = record_row(record, trial_id="unpruned", kind="unpruned", sweep_id=self.sweep_id, step=0)
        if self.store.add([row]):
            metrics = {
                "unpruned_macs": row["macs"],
                "unpruned_params": row["params"],
                **{f"unpruned_{k}": v for k, v in row["metrics"].items()},
            }
            self._log_metrics(self.parent_run_id, metrics)

    def finish(self, status: str = "FINISHED") -> None:
        """Update the fronts one last time and close the parent run."""
        self._require_sweep()
        self.update_front()
        self._close(_run_status(status))

    def fail(self, status: str = "FAILED") -> None:
        """Mark the parent run FAILED (the sweep raised) or KILLED (interrupted); ``--resume``
        reopens it."""
        self._require_sweep()
        self.store.flush()
        self._close(_run_status(status))

    def _close(self, status: str) -> None:
        """Stop the heartbeat; set ``rayprune.status`` (and, unless finished, the resume command
        as the run's note); close the parent run."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        word = {"FINISHED": "finished", "KILLED": "interrupted"}.get(status, "failed")
        mark_parent(
            self.client,
            self.parent_run_id,
            word,
            None if status == "FINISHED" else f"{word}; resume with: {self._resume}",
        )
        self.client.set_terminated(self.parent_run_id, status=status)

    def _require_sweep(self) -> None:
        if self.parent_run_id is None:
            raise RuntimeError("SweepTracker: call start_sweep(...) first")

    # -- trials -----------------------------------------------------------------------------------
    def trial_started(self, trial_id: str, params: dict[str, Any] | None = None, run_name: str | None = None) -> str:
        """The child run of ``trial_id`` (created once; reopened on resume); returns its id.
        ``run_name`` is what the UI lists (e.g. Tune's ``ast_f0.5_kd0.9_<id>``; default the id)."""
        self._require_sweep()
        trial_id = str(trial_id)
        self._remember_cell(trial_id, params or {})
        flat = flatten_params(params or {})
        run_id = self._trial_runs.get(trial_id)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name or trial_id,
                tags={PARENT_TAG: self.parent_run_id, ROLE_TAG: "trial", TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep_id},
            )
            run_id = self._trial_runs[trial_id] = run.info.run_id
            self._reattached.add(run_id)
            self._created.add(run_id)
            self._log_new_params(run_id, flat, {})
        elif run_id not in self._reattached:  # first contact after a resume
            self._reattached.add(run_id)
            run = self.client.get_run(run_id)
            if run.info.status != "FINISHED":  # Tune re-runs unfinished (and, if asked, errored) trials
                self.client.update_run(run_id, status="RUNNING")
                if STATUS_TAG in run.data.tags:  # "interrupted", set when its dead driver was found
                    self.client.delete_tag(run_id, STATUS_TAG)
            self._log_new_params(run_id, flat, run.data.params)
        return run_id

    def _remember_cell(self, trial_id: str, params: dict[str, Any], cell: dict[str, float] | None = None) -> None:
        if cell is not None:
            self._cells[trial_id] = dict(cell)
        elif "flops_target" in params and "kd_weight" in params:
            self._cells[trial_id] = {
                "flops_target": float(params["flops_target"]),
                "kd_weight": float(params["kd_weight"]),
            }

    def _cell_of(self, trial_id: str) -> dict[str, float]:
        return self._cells.get(trial_id, {})

    def _trial_run(self, trial_id: str) -> str:
        run_id = self._trial_runs.get(trial_id)
        return run_id if run_id in self._reattached else self.trial_started(trial_id)

    def log_step(
        self,
        trial_id: str,
        step: int,
        metrics: dict[str, Any],
        subnets: Iterable[dict[str, Any]],
        cell: dict[str, float] | None = None,
    ) -> int:
        """Record one reported step: its metrics on the trial run (once per step) and its
        subnet records (``SubnetRecord.to_dict()``) in the registry. ``cell`` (flops_target,
        kd_weight) defaults to what the trial's params said. Returns how many records were new."""
        trial_id = str(trial_id)
        self._remember_cell(trial_id, {}, cell)
        run_id = self._trial_run(trial_id)
        rows = [
            record_row(
                s,
                trial_id=trial_id,
                kind="search",
                sweep_id=self.sweep_id,
                run_id=run_id,
                step=step,
                **self._cell_of(trial_id),
            )
            for s in subnets
        ]
        added = self.store.add(rows)
        if step > self._last_step.get(trial_id, -1):
            values = {**_numeric_metrics(metrics), "subnets_in_step": len(rows)}
            self._log_metrics(run_id, values, step=step, tags={LAST_STEP_TAG: str(step)})
            self._last_step[trial_id] = step
        return added

    def trial_finished(
        self,
        trial_id: str,
        final: dict[str, Any] | None = None,
        artifacts_dir: str | Path | None = None,
        status: str = "FINISHED",
        *,
        refresh_front: bool = True,
        cell: dict[str, float] | None = None,
    ) -> None:
        """Close a trial: its final record (``SubnetRecord.to_dict()`` with test metrics) and
        saved subnet directory (spec.json, weights.pt, metrics.json) on the trial run, its
        subnet table, and the run status (FINISHED / FAILED / KILLED). Then, unless
        ``refresh_front`` is False, :meth:`update_front`: the front follows finished trials."""
        trial_id = str(trial_id)
        self._remember_cell(trial_id, {}, cell)
        run_id = self._trial_run(trial_id)
        artifact_uri = self._log_subnet_dir(run_id, artifacts_dir)
        own = self.store.rows(("search", "final"), trial_id)  # fine-tunes have their own runs
        metrics, tags = {}, self._table_tag(run_id, "subnets.json")
        if final is not None:
            row = record_row(
                final,
                trial_id=trial_id,
                kind="final",
                sweep_id=self.sweep_id,
                run_id=run_id,
                artifact_uri=artifact_uri,
                **self._cell_of(trial_id),
            )
            if self.store.add([row]):
                own.append(row)
                metrics = {"macs": row["macs"], "params": row["params"], **row["metrics"]}
                tags["rayprune.final_spec_hash"] = row["spec_hash"]
        self._write_table(run_id, [_table_row(r) for r in own], "subnets.json")
        if metrics or tags:  # one call for the final metrics and tags
            self._log_metrics(run_id, metrics, tags=tags)
        self.client.set_terminated(run_id, status=_run_status(status))
        if refresh_front:
            self.update_front()

    def log_finetuned(
        self,
        record: dict[str, Any],
        artifacts_dir: str | Path | None = None,
        *,
        trial_id: str,
        cell: str,
        flops_target: float | None = None,
        kd_weight: float | None = None,
    ) -> str:
        """Record a grid cell's chosen subnet fine-tuned with the sweep's final recipe:
        ``record`` is its ``SubnetRecord.to_dict()`` (test and robust accuracy, latency, the
        recipe in its source), ``artifacts_dir`` its saved subnet, ``trial_id`` the trial that
        chose it, ``cell`` the cell's name (``ast_f0.5_kd0.9``). One child run per cell
        (``finetune-<cell>``), whose metrics include ``macs_pct`` and ``latency_ms`` so the
        MLflow UI's table and charts show the front. Returns the run id."""
        self._require_sweep()
        run_id = self._member_runs.get(cell)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"finetune-{cell}",
                tags={
                    PARENT_TAG: self.parent_run_id,
                    ROLE_TAG: "finetune",
                    MEMBER_TAG: cell,
                    TRIAL_TAG: str(trial_id),
                    SWEEP_TAG: self.sweep_id,
                },
            )
            run_id = self._member_runs[cell] = run.info.run_id
            params = {
                "cell": cell,
                "trial_id": str(trial_id),
                "method": record.get("method", ""),
                "flops_target": flops_target,
                "kd_weight": kd_weight,
                "recipe": (record.get("source") or {}).get("recipe_tag"),
                "init": (record.get("source") or {}).get("init"),
            }
            self._log_new_params(run_id, flatten_params({k: v for k, v in params.items() if v is not None}), {})
        artifact_uri = self._log_subnet_dir(run_id, artifacts_dir)
        row = record_row(
            record,
            trial_id=str(trial_id),
            kind="finetuned",
            sweep_id=self.sweep_id,
            run_id=run_id,
            artifact_uri=artifact_uri,
            flops_target=flops_target,
            kd_weight=kd_weight,
        )
        if self.store.add([row]):
            self._log_metrics(run_id, self.candidate_metrics(row))
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def candidate_metrics(self, row: dict[str, Any]) -> dict[str, float]:
        """A finalized row's metrics for its run: every metric plus ``macs``, ``params``,
        ``macs_pct`` (of the baseline) and ``latency_ms`` (batch 1, median)."""
        metrics = {"macs": row["macs"], "params": row["params"], **row["metrics"]}
        base = baseline_row(self.store.rows(("unpruned",)))
        if base is not None and base["macs"]:
            metrics["macs_pct"] = 100.0 * row["macs"] / base["macs"]
        if "latency_ms_b1_p50" in row["metrics"]:
            metrics["latency_ms"] = row["metrics"]["latency_ms_b1_p50"]
        return metrics

    # -- grid cells --------------------------------------------------------------------------------
    def cell_stats(self) -> list[dict[str, Any]]:
        """Per grid cell of the trials' finals: ``cell``, ``trials``, ``distinct`` (different
        chosen subnets), ``reused`` (trials whose subnet came from the final-phase cache),
        ``outside_window`` (trials whose subnet is not in ``[0.9, 1] x`` the target MACs)."""
        cells: dict[tuple, dict[str, Any]] = {}
        for row in self.store.rows(("final",)):
            key = (row["method"], row.get("flops_target"), row.get("kd_weight"))
            entry = cells.setdefault(key, {"trials": 0, "specs": set(), "reused": 0, "outside": 0})
            entry["trials"] += 1
            entry["specs"].add(row["spec_hash"])
            entry["reused"] += bool(row["source"].get("reused_from"))
            entry["outside"] += (row["source"].get("window") or {}).get("status", "in_window") != "in_window"
        out = []
        for (method, target, kd), entry in sorted(cells.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
            name = method if target is None else f"{method}_f{target:g}_kd{(kd or 0):g}"
            out.append(
                {
                    "cell": name,
                    "trials": entry["trials"],
                    "distinct": len(entry["specs"]),
                    "reused": entry["reused"],
                    "outside_window": entry["outside"],
                }
            )
        return out

    def note_cell(self, method: str, flops_target: float, kd_weight: float) -> bool:
        """After a trial of the cell finished: when all of its (>= 2) trials chose one subnet
        under their different budgets, say once that the budgets do not bind there (a printed
        line and a parent-run tag). Returns True when it said so now."""
        name = f"{method}_f{flops_target:g}_kd{kd_weight:g}"
        if name in self._noted:
            return False
        stats = next((s for s in self.cell_stats() if s["cell"] == name), None)
        if stats is None or stats["trials"] < 2 or stats["distinct"] != 1:
            return False
        self._noted.add(name)
        print(
            f"rayprune: cell {name}: its {stats['trials']} trials all chose the same subnet under different "
            f"Optuna budgets: the per-stage budgets do not bind there ({stats['reused']} trial(s) reused the "
            "cached training instead of repeating it); narrow optuna.stage_prune or lower samples_per_cell",
            flush=True,
        )
        self.client.set_tag(self.parent_run_id, f"rayprune.budgets_do_not_bind.{name}", "true")
        return True

    # -- fronts -----------------------------------------------------------------------------------
    def update_front(self) -> dict[str, list[dict[str, Any]]]:
        """Recompute the fronts over every record so far; tag the runs owning members; log
        the front tables, the plot, ``subnets.parquet`` and the per-cell counts to the parent
        run. Called at the end of a sweep, on resume, and by :meth:`publish_if_due` as trials
        finish (not per trial: every call uploads the whole registry). Returns the fronts
        (:func:`~.pareto.compute_fronts`)."""
        self._require_sweep()
        rows = self.store.rows()
        fronts = compute_fronts(rows)
        self._tag_front_members(fronts)
        for name, members in fronts.items():
            self._log_table(
                self.parent_run_id, [_table_row(r) for r in members], f"pareto/front_{name.replace('/', '_')}.json"
            )
        with tempfile.TemporaryDirectory() as tmp:
            plot = Path(tmp) / "pareto.png"
            plot_fronts(rows, fronts, plot)
            self.client.log_artifact(self.parent_run_id, str(plot), "pareto")
        self.store.flush()
        if self.store.path.exists():
            self.client.log_artifact(self.parent_run_id, str(self.store.path))
        self._log_front_metrics(rows, fronts)
        self._published_at = time.monotonic()
        return fronts

    def publish_if_due(self, every_s: float = PUBLISH_EVERY_S) -> bool:
        """:meth:`update_front` unless one ran in the last ``every_s`` seconds; True when it ran.

        The driver calls it as trials finish, so ``rayprune front``, ``pick`` and the MLflow UI
        show a long sweep's progress, and a sweep whose driver was killed keeps the fronts of
        what it finished, at the cost of one upload of the registry per ``every_s``."""
        if self._published_at is not None and time.monotonic() - self._published_at < every_s:
            return False
        self.update_front()
        return True

    def _tag_front_members(self, fronts: dict[str, list[dict[str, Any]]]) -> None:
        owners: dict[str, set] = {kind: set() for kind in FRONT_TAGS}
        for name, members in fronts.items():
            owners[front_kind(name)].update(r["run_id"] for r in members)
        for run_id in {*self._trial_runs.values(), *self._member_runs.values()}:
            wanted = {tag: str(run_id in owners[kind]).lower() for kind, tag in FRONT_TAGS.items()}
            changed = {k: v for k, v in wanted.items() if self._tags.get(run_id, {}).get(k) != v}
            if changed:  # only changes: re-tagging every run on every update is O(trials^2) calls
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in changed.items()])
                self._tags.setdefault(run_id, {}).update(changed)

    def _log_front_metrics(self, rows: list[dict[str, Any]], fronts: dict[str, list[dict[str, Any]]]) -> None:
        base = baseline_row(rows)
        reference = base["macs"] if base else None
        metrics: dict[str, float] = {f"front_size/{name}": len(members) for name, members in fronts.items()}
        for name in fronts:
            if front_kind(name) == "search":
                points = [{"acc": r["metrics"].get("val_top1"), "macs": r["macs"]} for r in front_pool(rows, name)]
                metrics[f"hypervolume/{name}"] = hypervolume_2d(points, ref_cost=reference)
        for stats in self.cell_stats():
            metrics[f"cells/{stats['cell']}/distinct_subnets"] = stats["distinct"]
            metrics[f"cells/{stats['cell']}/reused_trials"] = stats["reused"]
            metrics[f"cells/{stats['cell']}/outside_window"] = stats["outside_window"]
        # step = records so far: monotone, and the same after a resume (a counter would restart)
        self._log_metrics(self.parent_run_id, metrics, step=len(self.store))

    def front_table(self) -> str:
        """The fronts as printable text tables (what ``rayprune front`` shows)."""
        return format_fronts(self.store.rows())

    # -- MLflow plumbing ---------------------------------------------------------------------------
    def _log_metrics(
        self, run_id: str, metrics: dict[str, Any], step: int = 0, tags: dict[str, str] | None = None
    ) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in (tags or {}).items()],
        )

    def _log_new_params(self, run_id: str, params: dict[str, str], logged: dict[str, str]) -> None:
        # MLflow params are write-once: re-logging a changed value raises, so a resume only
        # adds the keys the run does not have yet.
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=new[start : start + 100])

    def _log_subnet_dir(self, run_id: str, artifacts_dir: str | Path | None) -> str | None:
        if artifacts_dir is None:
            return None
        artifacts_dir = Path(artifacts_dir)
        if not (artifacts_dir / "spec.json").is_file() or not (artifacts_dir / "weights.pt").is_file():
            raise ValueError(
                f"artifacts_dir {str(artifacts_dir)!r} must hold spec.json and weights.pt (runner.save_subnet)"
            )
        self.client.log_artifacts(run_id, str(artifacts_dir), SUBNET_DIR)
        return f"runs:/{run_id}/{SUBNET_DIR}"

    def _log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Write ``rows`` as an MLflow table artifact, *replacing* any previous version
        (``mlflow.log_table`` appends, which would duplicate rows on every update)."""
        self._write_table(run_id, rows, artifact_file)
        tags = self._table_tag(run_id, artifact_file)
        if tags:
            self.client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, tags[LOGGED_ARTIFACTS_TAG])

    def _write_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(artifact_file).name
            pd.DataFrame(rows).to_json(local, orient="split", index=False)
            self.client.log_artifact(run_id, str(local), posixpath.dirname(artifact_file) or None)

    def _table_tag(self, run_id: str, artifact_file: str) -> dict[str, str]:
        """The ``mlflow.loggedArtifacts`` tag that makes ``artifact_file`` a table in the UI,
        when the run does not have it yet (``{}`` otherwise). A run this tracker created has no
        entries; only a reattached run's are read back."""
        if (run_id, artifact_file) in self._tables:
            return {}
        self._tables.add((run_id, artifact_file))
        entries = (
            []
            if run_id in self._created
            else json.loads(self.client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
        )
        entry = {"path": artifact_file, "type": "table"}
        return {} if entry in entries else {LOGGED_ARTIFACTS_TAG: json.dumps([*entries, entry])}
