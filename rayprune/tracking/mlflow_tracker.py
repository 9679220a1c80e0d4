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

import contextlib
import json
import os
import posixpath
import socket
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from . import TrackingError
from .pareto import (FRONT_METRIC, MODES, baseline_row, choose_operating_point, compute_fronts, finalized_pool,
                     front_kind, front_pool, hypervolume_2d, suggested_max_drop)
from .store import SubnetStore, record_row, row_key

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "rayprune.role"
SWEEP_TAG = "rayprune.sweep_id"
TRIAL_TAG = "rayprune.trial_id"
MEMBER_TAG = "rayprune.member_key"
LAST_STEP_TAG = "rayprune.last_step"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # what mlflow.log_table sets: the UI's table viewer
# MLflow 3's UI opens an experiment without this tag in GenAI (traces) mode; ours holds model runs.
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}
FRONT_TAGS = {"search": "rayprune.is_pareto", "final": "rayprune.is_pareto_final",
              "robust": "rayprune.is_pareto_robust"}  # by front kind (pareto.FRONT_KINDS)
SUBNETS_ARTIFACT = "subnets.parquet"
SUBNET_DIR = "subnet"  # artifact path of a run's saved subnet (spec.json, weights.pt, metrics.json)
VERSIONED = ("torch", "ray", "optuna", "mlflow", "rayprune")
RUN_STATUSES = {"FINISHED": "FINISHED", "COMPLETED": "FINISHED", "TERMINATED": "FINISHED",
                "FAILED": "FAILED", "ERROR": "FAILED", "KILLED": "KILLED", "STOPPED": "KILLED"}
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_PROBE_TIMEOUT_S = 3.0

# MLflow would print a progress bar for every small artifact download and, against a server,
# a "View run ... at ..." line for every run closed: noise in a sweep driver's output. Set (as
# defaults the user can override) when a client is made, never on import.
QUIET_MLFLOW = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


# --------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
    directory. SQLite paths are made absolute so the URI means the same file everywhere."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if "://" not in uri and uri.endswith(".db"):
        uri = f"sqlite:///{uri}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        uri = f"sqlite:///{path if path.is_absolute() else (Path.cwd() / path)}"
    return uri


def check_reachable(uri: str, *, must_exist: bool = False, timeout: float = _PROBE_TIMEOUT_S) -> None:
    """Fail fast, with one clear line, when the tracking store cannot be used: an HTTP server
    that does not accept a connection within ``timeout`` seconds (instead of MLflow's minutes
    of retries), a SQLite file in a missing directory, or (``must_exist``) no SQLite file."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        except OSError as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it "
                                "(mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000) or pass a "
                                "reachable --mlflow-uri / MLFLOW_TRACKING_URI") from None
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        if must_exist and not path.is_file():
            raise TrackingError(f"no MLflow database at {path}; run a sweep in that directory first or pass "
                                "--mlflow-uri (e.g. sqlite:////abs/path/mlflow.db or http://host:5000)")
        if not path.parent.is_dir():
            raise TrackingError(f"the directory of the MLflow database {path} does not exist; create it or "
                                "pass another --mlflow-uri")


def connect(uri: str | None = None, *, must_exist: bool = False) -> MlflowClient:
    """A tracking + registry client for ``uri`` (see :func:`resolve_tracking_uri`), after
    :func:`check_reachable` and, for a server, one API call that must succeed first time.
    Turns MLflow's per-download progress bars and run URLs off unless set (``QUIET_MLFLOW``)."""
    uri = resolve_tracking_uri(uri)
    check_reachable(uri, must_exist=must_exist)
    for key, value in QUIET_MLFLOW.items():
        os.environ.setdefault(key, value)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if urlparse(uri).scheme in ("http", "https"):
        _check_answers(client)
    return client


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_answers(client: MlflowClient) -> None:
    # Something listens on the port, but is it MLflow? Ask once without MLflow's retries
    # (minutes of back-off on 5xx), so a wrong port or proxy fails in seconds.
    try:
        with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MlflowException, requests errors: same advice
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(f"the tracking server at {client.tracking_uri} did not answer as an MLflow server "
                            f"({detail}); check --mlflow-uri / MLFLOW_TRACKING_URI and credentials") from None


def find_experiment(client: MlflowClient, name: str) -> str:
    """The id of the active experiment ``name``; :class:`TrackingError` listing the known ones."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments(max_results=50))
        state = "is deleted" if experiment is not None else "does not exist"
        raise TrackingError(f"experiment {name!r} {state} at {client.tracking_uri}; known experiments: "
                            f"{', '.join(known) or '(none)'}; pass --experiment NAME (and --mlflow-uri)")
    return experiment.experiment_id


def find_sweep_run(client: MlflowClient, experiment_id: str, sweep_id: str | None = None) -> Any:
    """The parent run of sweep ``sweep_id`` in the experiment, or its newest sweep."""
    query = f"tags.`{ROLE_TAG}` = 'sweep'"
    if sweep_id is not None:
        query += f" and tags.`{SWEEP_TAG}` = '{_quoted(sweep_id)}'"
    runs = client.search_runs([experiment_id], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        which = f"sweep {sweep_id!r}" if sweep_id is not None else "any sweep"
        name = client.get_experiment(experiment_id).name
        raise TrackingError(f"experiment {name!r} has no parent run of {which}; run `rayprune sweep` "
                            "first (or check --experiment / --sweep-id)")
    return runs[0]


def sweep_rows(client: MlflowClient, run: Any) -> list[dict[str, Any]]:
    """The subnet registry rows logged to a sweep's parent run (``subnets.parquet``)."""
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    sweep = run.data.tags.get(SWEEP_TAG, run.info.run_id)
    if SUBNETS_ARTIFACT not in names:
        raise TrackingError(f"sweep {sweep!r} has no Pareto front yet (no trial has finished); wait for a "
                            "trial to finish or resume the sweep")
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run.info.run_id, SUBNETS_ARTIFACT, tmp)
        return SubnetStore(local).rows()


def download_subnet(client: MlflowClient, artifact_uri: str, dst: str | Path) -> Path:
    """Download a saved subnet directory (``runs:/<run>/subnet``) into ``dst``."""
    try:
        return Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=client.tracking_uri))
    except (MlflowException, OSError) as e:
        raise TrackingError(f"cannot download the subnet weights at {artifact_uri}: {str(e).splitlines()[0]}; "
                            "was the artifact store moved or deleted?") from None


def register_choice(client: MlflowClient, parent: Any, model_name: str, alias: str, export_dir: str | Path,
                    row: dict[str, Any], description: str) -> Any:
    """Register an exported subnet as an MLflow model that ``mlflow.pyfunc`` loads and serves.

    A ``pick`` child run of the sweep's ``parent`` run gets the export's files (spec.json,
    weights.pt, model.onnx, model_card.md) under ``export/`` and the row's metrics; the ONNX
    graph is logged with ``mlflow.onnx.log_model`` (no pickled code), with a signature (float32
    ``[-1, C, H, W]`` -> logits) and an input example; a model version is created from it and
    ``model_name@alias`` points at it. Returns the ModelVersion."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    export_dir = Path(export_dir)
    run = client.create_run(parent.info.experiment_id, run_name=f"pick-{alias}", tags={
        PARENT_TAG: parent.info.run_id, ROLE_TAG: "pick", SWEEP_TAG: parent.data.tags.get(SWEEP_TAG, ""),
        "rayprune.mode": alias, "rayprune.source_key": row_key(row)})
    run_id = run.info.run_id
    try:
        client.log_artifacts(run_id, str(export_dir), "export")
        client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in
                                          {"macs": row["macs"], "params": row["params"], **row["metrics"]}.items()])
        session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
        example = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        signature = infer_signature(example, {"logits": session.run(None, {session.get_inputs()[0].name: example})[0]})
        # The registry resolves the logged model through the fluent tracking URI: all inside.
        with _fluent(client):
            with mlflow.start_run(run_id=run_id, nested=True):
                info = mlflow.onnx.log_model(onnx.load(str(export_dir / "model.onnx")), name="model",
                                             signature=signature, input_example=example,
                                             onnx_execution_providers=["CPUExecutionProvider"],
                                             save_as_external_data=False)
            try:
                client.create_registered_model(model_name, description="rayprune operating points (pick)")
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(model_name, source=info.model_uri, run_id=run_id,
                                                  description=description, model_id=info.model_id,
                                                  tags={"rayprune.mode": alias, "rayprune.source_key": row_key(row)})
            client.set_registered_model_alias(model_name, alias, version.version)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return version


@contextlib.contextmanager
def _fluent(client: MlflowClient) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.onnx.log_model``) at the client's store for a while."""
    import mlflow

    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)


def _quoted(value: str) -> str:
    if "'" in value or "`" in value:
        raise ValueError(f"ids may not contain quotes or backticks: {value!r}")
    return value


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
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
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
    flat = {"key": row_key(row), **{k: row.get(k) for k in ("trial_id", "kind", "step", "method", "flops_target",
                                                           "kd_weight", "recipe", "init", "macs", "params")}}
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

    def __init__(self, tracking_uri: str | None = None, experiment: str = "rayprune",
                 workdir: str | Path = ".") -> None:
        self.client = connect(tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        self.experiment = experiment
        self.experiment_id = self._experiment_id(experiment)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = SubnetStore(self.workdir / SUBNETS_ARTIFACT)
        self.sweep_id: str | None = None
        self.parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._member_runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._tags: dict[str, dict[str, str]] = {}  # run id -> front tags as last set
        self._reattached: set[str] = set()
        self._tables: set[tuple[str, str]] = set()  # (run id, artifact file) registered as tables
        self._cells: dict[str, dict[str, float]] = {}  # trial id -> {"flops_target", "kd_weight"}
        self._noted: set[str] = set()  # cells already reported as "budgets do not bind"

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, artifact_location=self._artifact_location(),
                                                 tags=EXPERIMENT_KIND_TAGS)
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore) or "
                                "pass another --experiment")
        return experiment.experiment_id

    def _artifact_location(self) -> str | None:
        # For SQLite, MLflow's default artifact root is ./mlruns of whatever directory the
        # process runs in; pin it beside the database so every process finds the files.
        if self.tracking_uri.startswith("sqlite:///"):
            return str(Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts")
        return None  # a server decides (--artifacts-destination)

    # -- sweep ------------------------------------------------------------------------------------
    def start_sweep(self, sweep_id: str, resolved_config: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """Open (or, on resume, reopen) the parent run of ``sweep_id``; returns its run id."""
        self.sweep_id = sweep_id
        parent = self._existing_parent(sweep_id)
        if parent is None:
            run = self.client.create_run(self.experiment_id, run_name=sweep_id,
                                         tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep_id})
            self.parent_run_id, logged = run.info.run_id, {}
        else:
            self.parent_run_id, logged = parent.info.run_id, parent.data.params
            self.client.update_run(self.parent_run_id, status="RUNNING")
        params = {"sweep_id": sweep_id, **{k: v for k, v in resolved_config.items()
                                           if isinstance(v, (str, int, float, bool)) or v is None}}
        for section in ("dataset", "grid"):  # small sections the UI and `pick` want as params (dataset.name)
            if isinstance(resolved_config.get(section), dict):
                params[section] = resolved_config[section]
        self._log_new_params(self.parent_run_id, flatten_params(params), logged)
        run_tags = {**(tags or {}), **{f"version.{k}": v for k, v in library_versions().items()}}
        sha = git_sha()
        if sha:
            run_tags["git_sha"] = sha
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in run_tags.items()])
        self.client.log_dict(self.parent_run_id, json.loads(json.dumps(resolved_config, default=str)),
                             "sweep/resolved_sweep.json")
        if parent is not None:
            self._reattach_children()
            self._restore_store()
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
            page = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                           max_results=1000, page_token=token)
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
            metrics = {"unpruned_macs": row["macs"], "unpruned_params": row["params"],
                       **{f"unpruned_{k}": v for k, v in row["metrics"].items()}}
            self._log_metrics(self.parent_run_id, metrics)

    def finish(self, status: str = "FINISHED") -> None:
        """Update the fronts one last time and close the parent run."""
        self._require_sweep()
        self.update_front()
        self.client.set_terminated(self.parent_run_id, status=_run_status(status))

    def fail(self) -> None:
        """Mark the parent run FAILED (the sweep raised); ``--resume`` reopens it."""
        self._require_sweep()
        self.client.set_terminated(self.parent_run_id, status="FAILED")

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
            run = self.client.create_run(self.experiment_id, run_name=run_name or trial_id, tags={
                PARENT_TAG: self.parent_run_id, ROLE_TAG: "trial", TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep_id})
            run_id = self._trial_runs[trial_id] = run.info.run_id
            self._reattached.add(run_id)
            self._log_new_params(run_id, flat, {})
        elif run_id not in self._reattached:  # first contact after a resume
            self._reattached.add(run_id)
            run = self.client.get_run(run_id)
            if run.info.status != "FINISHED":  # Tune re-runs unfinished (and, if asked, errored) trials
                self.client.update_run(run_id, status="RUNNING")
            self._log_new_params(run_id, flat, run.data.params)
        return run_id

    def _remember_cell(self, trial_id: str, params: dict[str, Any], cell: dict[str, float] | None = None) -> None:
        if cell is not None:
            self._cells[trial_id] = dict(cell)
        elif "flops_target" in params and "kd_weight" in params:
            self._cells[trial_id] = {"flops_target": float(params["flops_target"]),
                                     "kd_weight": float(params["kd_weight"])}

    def _cell_of(self, trial_id: str) -> dict[str, float]:
        return self._cells.get(trial_id, {})

    def _trial_run(self, trial_id: str) -> str:
        run_id = self._trial_runs.get(trial_id)
        return run_id if run_id in self._reattached else self.trial_started(trial_id)

    def log_step(self, trial_id: str, step: int, metrics: dict[str, Any], subnets: Iterable[dict[str, Any]],
                 cell: dict[str, float] | None = None) -> int:
        """Record one reported step: its metrics on the trial run (once per step) and its
        subnet records (``SubnetRecord.to_dict()``) in the registry. ``cell`` (flops_target,
        kd_weight) defaults to what the trial's params said. Returns how many records were new."""
        trial_id = str(trial_id)
        self._remember_cell(trial_id, {}, cell)
        run_id = self._trial_run(trial_id)
        rows = [record_row(s, trial_id=trial_id, kind="search", sweep_id=self.sweep_id, run_id=run_id, step=step,
                           **self._cell_of(trial_id)) for s in subnets]
        added = self.store.add(rows)
        if step > self._last_step.get(trial_id, -1):
            values = {**_numeric_metrics(metrics), "subnets_in_step": len(rows)}
            self._log_metrics(run_id, values, step=step, tags={LAST_STEP_TAG: str(step)})
            self._last_step[trial_id] = step
        return added

    def trial_finished(self, trial_id: str, final: dict[str, Any] | None = None,
                       artifacts_dir: str | Path | None = None, status: str = "FINISHED", *,
                       refresh_front: bool = True, cell: dict[str, float] | None = None) -> None:
        """Close a trial: its final record (``SubnetRecord.to_dict()`` with test metrics) and
        saved subnet directory (spec.json, weights.pt, metrics.json) on the trial run, its
        subnet table, and the run status (FINISHED / FAILED / KILLED). Then, unless
        ``refresh_front`` is False, :meth:`update_front`: the front follows finished trials."""
        trial_id = str(trial_id)
        self._remember_cell(trial_id, {}, cell)
        run_id = self._trial_run(trial_id)
        artifact_uri = self._log_subnet_dir(run_id, artifacts_dir)
        if final is not None:
            row = record_row(final, trial_id=trial_id, kind="final", sweep_id=self.sweep_id, run_id=run_id,
                             artifact_uri=artifact_uri, **self._cell_of(trial_id))
            if self.store.add([row]):
                self._log_metrics(run_id, {"macs": row["macs"], "params": row["params"], **row["metrics"]},
                                  tags={"rayprune.final_spec_hash": row["spec_hash"]})
        own = self.store.rows(("search", "final"), trial_id)  # fine-tunes have their own runs
        self._log_table(run_id, [_table_row(r) for r in own], "subnets.json")
        self.client.set_terminated(run_id, status=_run_status(status))
        if refresh_front:
            self.update_front()

    def log_finetuned(self, record: dict[str, Any], artifacts_dir: str | Path | None = None, *, trial_id: str,
                      cell: str, flops_target: float | None = None, kd_weight: float | None = None) -> str:
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
                self.experiment_id, run_name=f"finetune-{cell}",
                tags={PARENT_TAG: self.parent_run_id, ROLE_TAG: "finetune", MEMBER_TAG: cell,
                      TRIAL_TAG: str(trial_id), SWEEP_TAG: self.sweep_id})
            run_id = self._member_runs[cell] = run.info.run_id
            params = {"cell": cell, "trial_id": str(trial_id), "method": record.get("method", ""),
                      "flops_target": flops_target, "kd_weight": kd_weight,
                      "recipe": (record.get("source") or {}).get("recipe_tag"),
                      "init": (record.get("source") or {}).get("init")}
            self._log_new_params(run_id, flatten_params({k: v for k, v in params.items() if v is not None}), {})
        artifact_uri = self._log_subnet_dir(run_id, artifacts_dir)
        row = record_row(record, trial_id=str(trial_id), kind="finetuned", sweep_id=self.sweep_id, run_id=run_id,
                         artifact_uri=artifact_uri, flops_target=flops_target, kd_weight=kd_weight)
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
            out.append({"cell": name, "trials": entry["trials"], "distinct": len(entry["specs"]),
                        "reused": entry["reused"], "outside_window": entry["outside"]})
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
        print(f"rayprune: cell {name}: its {stats['trials']} trials all chose the same subnet under different "
              f"Optuna budgets: the per-stage budgets do not bind there ({stats['reused']} trial(s) reused the "
              "cached training instead of repeating it); narrow optuna.stage_prune or lower samples_per_cell",
              flush=True)
        self.client.set_tag(self.parent_run_id, f"rayprune.budgets_do_not_bind.{name}", "true")
        return True

    # -- fronts -----------------------------------------------------------------------------------
    def update_front(self) -> dict[str, list[dict[str, Any]]]:
        """Recompute the fronts over every record so far; tag the runs owning members; log
        the front tables, the plot, ``subnets.parquet`` and the per-cell counts to the parent
        run. Called at the end of a sweep and on resume (not per trial: every call uploads the
        whole registry). Returns the fronts (:func:`~.pareto.compute_fronts`)."""
        self._require_sweep()
        rows = self.store.rows()
        fronts = compute_fronts(rows)
        self._tag_front_members(fronts)
        for name, members in fronts.items():
            self._log_table(self.parent_run_id, [_table_row(r) for r in members],
                            f"pareto/front_{name.replace('/', '_')}.json")
        with tempfile.TemporaryDirectory() as tmp:
            plot = Path(tmp) / "pareto.png"
            plot_fronts(rows, fronts, plot)
            self.client.log_artifact(self.parent_run_id, str(plot), "pareto")
        if self.store.path.exists():
            self.client.log_artifact(self.parent_run_id, str(self.store.path))
        self._log_front_metrics(rows, fronts)
        return fronts

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
        from .cli import format_fronts

        return format_fronts(self.store.rows())

    # -- MLflow plumbing ---------------------------------------------------------------------------
    def _log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0,
                     tags: dict[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in (tags or {}).items()])

    def _log_new_params(self, run_id: str, params: dict[str, str], logged: dict[str, str]) -> None:
        # MLflow params are write-once: re-logging a changed value raises, so a resume only
        # adds the keys the run does not have yet.
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=new[start:start + 100])

    def _log_subnet_dir(self, run_id: str, artifacts_dir: str | Path | None) -> str | None:
        if artifacts_dir is None:
            return None
        artifacts_dir = Path(artifacts_dir)
        if not (artifacts_dir / "spec.json").is_file() or not (artifacts_dir / "weights.pt").is_file():
            raise ValueError(f"artifacts_dir {str(artifacts_dir)!r} must hold spec.json and weights.pt "
                             "(runner.save_subnet)")
        self.client.log_artifacts(run_id, str(artifacts_dir), SUBNET_DIR)
        return f"runs:/{run_id}/{SUBNET_DIR}"

    def _log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Write ``rows`` as an MLflow table artifact, *replacing* any previous version
        (``mlflow.log_table`` appends, which would duplicate rows on every update)."""
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(artifact_file).name
            pd.DataFrame(rows).to_json(local, orient="split", index=False)
            self.client.log_artifact(run_id, str(local), posixpath.dirname(artifact_file) or None)
        if (run_id, artifact_file) not in self._tables:
            entries = json.loads(self.client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
            entry = {"path": artifact_file, "type": "table"}
            if entry not in entries:
                self.client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, json.dumps(entries + [entry]))
            self._tables.add((run_id, artifact_file))


# --------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------


def plot_fronts(rows: list[dict[str, Any]], fronts: dict[str, list[dict[str, Any]]], path: str | Path,
                picks: dict[str, dict[str, Any]] | None = None) -> Path:
    """The fronts as a PNG (see :func:`front_figure`)."""
    front_figure(rows, fronts, picks).savefig(path, dpi=110)
    return Path(path)


_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
_GROUP_STYLES = ("-", "--", ":", "-.")


def default_picks(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What ``rayprune pick --mode M`` would choose with default options, or with the
    :func:`~.pareto.suggested_max_drop` the sweep prints when nothing is within the default
    drop, per mode (labelled ``"<mode> pick (max-drop D)"``)."""
    drop = suggested_max_drop(rows)
    picks = {}
    if drop is None:
        return picks
    for mode in MODES:
        try:
            picks[f"{mode} pick (max-drop {drop:g})"] = choose_operating_point(rows, mode, max_drop=drop)[0]
        except Exception:  # noqa: BLE001 - TrackingError: nothing qualifies
            continue
    return picks


def front_figure(rows: list[dict[str, Any]], fronts: dict[str, list[dict[str, Any]]],
                 picks: dict[str, dict[str, Any]] | None = None) -> Any:
    """Three panels against MACs (% of the unpruned baseline; MACs in millions on top):

    ``picks`` maps a label to a picked row (default :func:`default_picks`).

    * **test top-1**: every equally-treated finalized subnet (the end-of-sweep fine-tunes),
      coloured by method, one marker per KD weight; the trials' own finals (short search
      recipe, never ranked against them) as hollow markers; the final fronts as staircases
      (one per recipe group), the baseline as a horizontal line, the FLOPs targets as vertical
      lines, the picked points (``picks``, default: :func:`default_picks`) ringed;
    * **robust top-1** (corruption accuracy): the same, with the robust fronts;
    * **search val_top1**: every search-time subnet, one staircase front per method (val_top1
      is measured differently by each method: it is never mixed with test accuracy).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg canvas by default

    picks = default_picks(rows) if picks is None else picks
    base = baseline_row(rows)
    ref = base["macs"] if base else max((r["macs"] for r in rows), default=1)
    pct = lambda r: 100.0 * r["macs"] / ref  # noqa: E731
    methods = sorted({r["method"] for r in rows if r["kind"] != "unpruned"})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    kds = sorted({float(r["kd_weight"]) for r in rows if r.get("kd_weight") is not None})
    markers = {kd: _MARKERS[i % len(_MARKERS)] for i, kd in enumerate(kds)}
    pool = finalized_pool(rows)
    trial_finals = [r for r in rows if r["kind"] == "final"] if pool and pool[0]["kind"] == "finetuned" else []
    targets = sorted({float(r["flops_target"]) for r in rows if r.get("flops_target") is not None})

    fig = Figure(figsize=(17, 5.2), layout="constrained")
    test_ax, robust_ax, search_ax = fig.subplots(1, 3)
    for ax, kind in ((test_ax, "final"), (robust_ax, "robust")):
        metric = FRONT_METRIC[kind]
        for method in methods:
            for kd in kds or [None]:
                group = [r for r in pool if r["method"] == method and (kd is None or r.get("kd_weight") == kd)
                         and r["metrics"].get(metric) is not None]
                if group:
                    ax.scatter([pct(r) for r in group], [r["metrics"][metric] for r in group], s=42,
                               color=colors[method], marker=markers.get(kd, "o"), zorder=3,
                               label=f"{method}" + ("" if kd is None else f" kd {kd:g}"), gid="finalized")
        hollow = [r for r in trial_finals if r["metrics"].get(metric) is not None]
        if hollow:
            ax.scatter([pct(r) for r in hollow], [r["metrics"][metric] for r in hollow], s=22, facecolors="none",
                       edgecolors=[colors[r["method"]] for r in hollow], linewidths=0.8, zorder=2, alpha=0.7,
                       label="trials' own finals (search recipe, not ranked)", gid="trial_finals")
        for i, (name, members) in enumerate(n for n in fronts.items() if front_kind(n[0]) == kind):
            if members:
                ax.step([pct(r) for r in members], [r["metrics"][metric] for r in members], where="post",
                        color="black", linestyle=_GROUP_STYLES[i % len(_GROUP_STYLES)], linewidth=1.2, zorder=4,
                        label=f"{kind} front [{name.split('/', 1)[1]}]", gid="front")
        value = None if base is None else base["metrics"].get(metric)
        if value is not None and value == value:
            ax.axhline(value, color="tab:red", linestyle="--", linewidth=1,
                       label=f"unpruned baseline ({value:.3f})", gid="baseline")
        ax.axvline(100.0, color="tab:red", linestyle=":", linewidth=0.8)
        for mode, row in picks.items():
            if row.get("metrics", {}).get(metric) is not None:
                ax.scatter([pct(row)], [row["metrics"][metric]], s=220, facecolors="none", edgecolors="black",
                           linewidths=2, marker="o" if mode.startswith("efficient") else "s", zorder=5,
                           label=mode, gid="pick")
    for method in methods:
        searched = [r for r in rows if r["kind"] == "search" and r["method"] == method
                    and r["metrics"].get("val_top1") is not None]
        if searched:
            search_ax.scatter([pct(r) for r in searched], [r["metrics"]["val_top1"] for r in searched], s=10,
                              color=colors[method], alpha=0.35, label=f"{method} subnets", gid="search")
        members = fronts.get(f"search/{method}", [])
        if members:
            search_ax.step([pct(r) for r in members], [r["metrics"]["val_top1"] for r in members], where="post",
                           color=colors[method], linewidth=1.5, label=f"{method} search front", gid="front")
    titles = ((test_ax, "test top-1 of fine-tuned subnets", "test top-1"),
              (robust_ax, "robust top-1 (corruption suite)", "robust top-1"),
              (search_ax, "search-val top-1, per method (search time)", "val_top1 (method's search split)"))
    for ax, title, ylabel in titles:
        for target in targets:
            ax.axvline(100.0 * target, color="0.6", linestyle=":", linewidth=1, gid="target")
        ax.set(title=title, xlabel="MACs (% of unpruned)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda p: p * ref / 100e6, lambda m: m * 100e6 / ref))
        top.set_xlabel("MACs (millions)")
        if ax.has_data():
            ax.legend(loc="lower right", fontsize=7)
    if targets:
        fig.suptitle("dotted verticals: FLOPs targets " + ", ".join(f"{100 * t:g}%" for t in targets), fontsize=9)
    return fig
