"""The sweep's MLflow runs: one parent run, a child run per trial and per fine-tuned grid cell.

:class:`RunWriter` knows the runs' layout and how to write to them; what is recorded on them
comes from :mod:`.mlflow_tracker` (the records) and :mod:`.publisher` (the fronts). Only the sweep
*driver* writes (trials never touch MLflow), so the default SQLite store has a single writer and
never locks. The runs:

* **parent run** (tags ``rayprune.role=sweep``, ``rayprune.sweep_id``): the resolved sweep file
  (``sweep/resolved_sweep.json``), the sweep id, seed and top-level config values (and the small
  ``dataset`` and ``grid`` sections) as params, the git SHA and library versions as tags.
* **trial runs** (``mlflow.parentRunId`` = parent, ``rayprune.role=trial``, ``rayprune.trial_id``):
  params, per-step metrics (tagged ``rayprune.last_step``), the final subnet's files under
  ``subnet/``, the trial's subnet records as one table ``subnets.json``.
* **fine-tune runs** (``rayprune.role=finetune``, ``rayprune.member_key`` = the cell, named
  ``finetune-<cell>``): one per grid cell.

Tags ``rayprune.is_pareto[_final|_robust]`` mark the child runs owning a member of a front. The
experiment carries the tags that make MLflow's UI open on the fine-tuned candidates
(:func:`.mlflow_ui.experiment_ui_tags`: the experiment kind and a saved view), set when the writer
creates it and when it opens one that lacks them.

Everything is idempotent on resume: the parent is found by its sweep-id tag and the child runs
by their tags (:meth:`RunWriter.reattach_children`); params are write-once in MLflow, so only
keys a run lacks are logged; per-step metrics are skipped for steps at or below the run's
``rayprune.last_step`` tag; artifacts overwrite. Tables are written whole (``mlflow.log_table``
appends) and registered once in the run's ``mlflow.loggedArtifacts`` tag, which makes the UI
show them as tables.
"""

from __future__ import annotations

import json
import posixpath
import subprocess
import tempfile
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from . import TrackingError
from .liveness import STATUS_TAG
from .lookup import PARENT_TAG, ROLE_TAG, SUBNETS_ARTIFACT, SWEEP_TAG, connect, find_sweep_run
from .mlflow_ui import experiment_ui_tags
from .store import SubnetStore

TRIAL_TAG = "rayprune.trial_id"
MEMBER_TAG = "rayprune.member_key"
LAST_STEP_TAG = "rayprune.last_step"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # what mlflow.log_table sets: the UI's table viewer
FRONT_TAGS = {
    "search": "rayprune.is_pareto",
    "final": "rayprune.is_pareto_final",
    "robust": "rayprune.is_pareto_robust",
}  # by front kind (pareto.FRONT_KINDS)
SUBNET_DIR = "subnet"  # artifact path of a run's saved subnet (spec.json, weights.pt, metrics.json)
TRIAL_TABLE = "subnets.json"  # a trial run's subnet records, as an MLflow table
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
_MAX_BATCH_PARAMS = 100  # MLflow's limit on the params of one log_batch


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


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric values of ``metrics`` as floats (MLflow metrics are numbers)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def run_status(status: str) -> str:
    """The MLflow run status for a Tune-like ``status`` (``COMPLETED`` -> ``FINISHED``, ...)."""
    try:
        return RUN_STATUSES[status.upper()]
    except KeyError:
        raise ValueError(f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}") from None


def parent_params(sweep_id: str, resolved_config: dict[str, Any]) -> dict[str, str]:
    """The parent run's params: the sweep id, the config's top-level scalars, and the small
    sections the UI and ``pick`` want as params (``dataset.name``)."""
    params = {
        "sweep_id": sweep_id,
        **{k: v for k, v in resolved_config.items() if isinstance(v, (str, int, float, bool)) or v is None},
    }
    for section in ("dataset", "grid"):
        if isinstance(resolved_config.get(section), dict):
            params[section] = resolved_config[section]
    return flatten_params(params)


class RunWriter:
    """The sweep driver's runs in one MLflow experiment, and every write to them.

    ``tracking_uri`` None means ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the working
    directory. An unreachable server raises :class:`TrackingError` within seconds.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "rayprune") -> None:
        self.client = connect(tracking_uri)
        self.tracking_uri: str = self.client.tracking_uri
        self.experiment = experiment
        self.experiment_id = self._experiment_id(experiment)
        self.sweep_id: str | None = None
        self.parent_run_id: str | None = None
        self.trial_runs: dict[str, str] = {}  # trial id -> run id
        self.member_runs: dict[str, str] = {}  # cell name -> fine-tune run id
        self._last_step: dict[str, int] = {}  # trial id -> last step logged
        self._front_tags: dict[str, dict[str, str]] = {}  # run id -> front tags as last set
        self._reattached: set[str] = set()  # trial runs opened (created or reopened) by this writer
        self._tables: set[tuple[str, str]] = set()  # (run id, artifact file) registered as tables
        self._created: set[str] = set()  # runs this writer created (their tags are known: none yet)

    def _experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created when missing, with the tags that make MLflow's UI
        open on the candidates (:func:`.mlflow_ui.experiment_ui_tags`): an experiment created by
        another tool or an older rayprune gets them when a sweep starts or resumes in it."""
        now_ms = int(time.time() * 1000)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            tags = experiment_ui_tags({}, now_ms)
            return str(self.client.create_experiment(name, artifact_location=self._artifact_location(), tags=tags))
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"experiment {name!r} is deleted; restore it (mlflow experiments restore) or pass another --experiment"
            )
        for key, value in experiment_ui_tags(experiment.tags, now_ms).items():
            self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return str(experiment.experiment_id)

    def _artifact_location(self) -> str | None:
        # For SQLite, MLflow's default artifact root is ./mlruns of whatever directory the
        # process runs in; pin it beside the database so every process finds the files.
        if self.tracking_uri.startswith("sqlite:///"):
            return str(Path(self.tracking_uri[len("sqlite:///") :]).parent / "mlartifacts")
        return None  # a server decides (--artifacts-destination)

    @property
    def parent(self) -> str:
        """The parent run's id (:meth:`open_parent` first)."""
        if self.parent_run_id is None:
            raise RuntimeError("RunWriter: call open_parent(...) first")
        return self.parent_run_id

    # -- the parent run ---------------------------------------------------------------------------
    def open_parent(self, sweep_id: str, resolved_config: dict[str, Any], tags: dict[str, str]) -> Any | None:
        """Create the parent run of ``sweep_id``, or reopen it (RUNNING again) when the experiment
        has one; log its params (new keys only), ``tags`` with the versions and git SHA, and the
        resolved sweep file. Returns the reopened run as it was found, or None when created."""
        self.sweep_id = sweep_id
        parent = self._existing_parent(sweep_id)
        if parent is None:
            run = self.client.create_run(
                self.experiment_id, run_name=sweep_id, tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep_id}
            )
            self.parent_run_id, logged = run.info.run_id, {}
        else:
            self.parent_run_id, logged = parent.info.run_id, parent.data.params
            self.client.update_run(self.parent_run_id, status="RUNNING")
        self.log_new_params(self.parent, parent_params(sweep_id, resolved_config), logged)
        run_tags = {**tags, **{f"version.{k}": v for k, v in library_versions().items()}}
        sha = git_sha()
        if sha:
            run_tags["git_sha"] = sha
        self.client.log_batch(self.parent, tags=[RunTag(k, str(v)) for k, v in run_tags.items()])
        self.client.log_dict(
            self.parent, json.loads(json.dumps(resolved_config, default=str)), "sweep/resolved_sweep.json"
        )
        return parent

    def _existing_parent(self, sweep_id: str) -> Any | None:
        try:
            return find_sweep_run(self.client, self.experiment_id, sweep_id)
        except TrackingError:
            return None

    def reattach_children(self) -> dict[str, dict[str, str]]:
        """Rebuild the trial/fine-tune run maps of a reopened parent from the runs' tags; returns
        each trial run's params by trial id."""
        trial_params: dict[str, dict[str, str]] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent}'", max_results=1000, page_token=token
            )
            for run in page:
                tags, run_id = run.data.tags, run.info.run_id
                if tags.get(ROLE_TAG) == "trial":
                    self.trial_runs[tags[TRIAL_TAG]] = run_id
                    self._last_step[tags[TRIAL_TAG]] = int(tags.get(LAST_STEP_TAG, -1))
                    trial_params[tags[TRIAL_TAG]] = run.data.params
                elif tags.get(ROLE_TAG) == "finetune":
                    self.member_runs[tags[MEMBER_TAG]] = run_id
                self._front_tags[run_id] = {t: tags[t] for t in FRONT_TAGS.values() if t in tags}
            token = page.token
            if not token:
                return trial_params

    def logged_subnet_rows(self) -> list[dict[str, Any]]:
        """The rows of the ``subnets.parquet`` last logged to the parent run ([] when none was)."""
        if SUBNETS_ARTIFACT not in {f.path for f in self.client.list_artifacts(self.parent)}:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            local = self.client.download_artifacts(self.parent, SUBNETS_ARTIFACT, tmp)
            return SubnetStore(local).rows()

    def close_parent(self, status: str) -> None:
        """Set the parent run's MLflow status (FINISHED / FAILED / KILLED)."""
        self.client.set_terminated(self.parent, status=status)

    def tag_parent(self, key: str, value: str) -> None:
        """Set one tag on the parent run."""
        self.client.set_tag(self.parent, key, value)

    def log_parent_artifact(self, local: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file to the parent run (under ``artifact_path``, default the root)."""
        self.client.log_artifact(self.parent, str(local), artifact_path)

    # -- child runs -------------------------------------------------------------------------------
    def trial_run(self, trial_id: str, params: dict[str, str], run_name: str | None = None) -> str:
        """The run of ``trial_id``: created once (named ``run_name``, default the id), reopened at
        the first contact after a resume (RUNNING again unless it finished); ``params`` are
        flat MLflow params, of which only new keys are logged. Returns its id."""
        run_id = self.trial_runs.get(trial_id)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name or trial_id,
                tags={PARENT_TAG: self.parent, ROLE_TAG: "trial", TRIAL_TAG: trial_id, SWEEP_TAG: str(self.sweep_id)},
            )
            run_id = self.trial_runs[trial_id] = run.info.run_id
            self._reattached.add(run_id)
            self._created.add(run_id)
            self.log_new_params(run_id, params, {})
        elif run_id not in self._reattached:  # first contact after a resume
            self._reattached.add(run_id)
            run = self.client.get_run(run_id)
            if run.info.status != "FINISHED":  # Tune re-runs unfinished (and, if asked, errored) trials
                self.client.update_run(run_id, status="RUNNING")
                if STATUS_TAG in run.data.tags:  # "interrupted", set when its dead driver was found
                    self.client.delete_tag(run_id, STATUS_TAG)
            self.log_new_params(run_id, params, run.data.params)
        return run_id

    def open_trial_run(self, trial_id: str) -> str:
        """The run of ``trial_id`` as :meth:`trial_run` opens it, for a trial that reports
        without having started in this driver (a resume; a trial never reported as started)."""
        run_id = self.trial_runs.get(trial_id)
        return run_id if run_id is not None and run_id in self._reattached else self.trial_run(trial_id, {})

    def log_step(self, trial_id: str, step: int, metrics: dict[str, float]) -> None:
        """A reported step's metrics on the trial's run, unless that step is already logged."""
        if step > self._last_step.get(trial_id, -1):
            self.log_metrics(self.open_trial_run(trial_id), metrics, step=step, tags={LAST_STEP_TAG: str(step)})
            self._last_step[trial_id] = step

    def close_trial_run(
        self, run_id: str, table: list[dict[str, Any]], metrics: dict[str, Any], tags: dict[str, str], status: str
    ) -> None:
        """Write the trial's subnet ``table``, its final ``metrics`` and ``tags`` (one batch, with
        the table's registration when new), and its status (FINISHED / FAILED / KILLED)."""
        tags = {**self.table_tag(run_id, TRIAL_TABLE), **tags}
        self.write_table(run_id, table, TRIAL_TABLE)
        if metrics or tags:
            self.log_metrics(run_id, metrics, tags=tags)
        self.client.set_terminated(run_id, status=run_status(status))

    def finetune_run(self, cell: str, trial_id: str, params: dict[str, str]) -> str:
        """The fine-tune run of grid cell ``cell`` (``finetune-<cell>``), created once with
        ``params`` and the id of the trial whose subnet it fine-tunes. Returns its id."""
        run_id = self.member_runs.get(cell)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"finetune-{cell}",
                tags={
                    PARENT_TAG: self.parent,
                    ROLE_TAG: "finetune",
                    MEMBER_TAG: cell,
                    TRIAL_TAG: trial_id,
                    SWEEP_TAG: str(self.sweep_id),
                },
            )
            run_id = self.member_runs[cell] = run.info.run_id
            self.log_new_params(run_id, params, {})
        return run_id

    def close_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Set a child run's status (FINISHED / FAILED / KILLED, or Tune's names for them)."""
        self.client.set_terminated(run_id, status=run_status(status))

    def tag_front_members(self, owners: Mapping[str, set[str]]) -> None:
        """Tag every child run ``rayprune.is_pareto[_final|_robust]`` true or false: whether it is
        in ``owners`` (run ids by front kind). Only changed tags are written: re-tagging every run
        on every update would be O(trials^2) calls over a sweep."""
        for run_id in {*self.trial_runs.values(), *self.member_runs.values()}:
            wanted = {tag: str(run_id in owners[kind]).lower() for kind, tag in FRONT_TAGS.items()}
            changed = {k: v for k, v in wanted.items() if self._front_tags.get(run_id, {}).get(k) != v}
            if changed:
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in changed.items()])
                self._front_tags.setdefault(run_id, {}).update(changed)

    # -- writing ----------------------------------------------------------------------------------
    def log_metrics(
        self, run_id: str, metrics: dict[str, Any], step: int = 0, tags: dict[str, str] | None = None
    ) -> None:
        """``metrics`` (as floats, at ``step``) and ``tags`` on a run in one call."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in (tags or {}).items()],
        )

    def log_new_params(self, run_id: str, params: dict[str, str], logged: dict[str, str]) -> None:
        """Log the ``params`` whose keys are not in ``logged`` (the run's params so far)."""
        # MLflow params are write-once: re-logging a changed value raises, so a resume only
        # adds the keys the run does not have yet.
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), _MAX_BATCH_PARAMS):
            self.client.log_batch(run_id, params=new[start : start + _MAX_BATCH_PARAMS])

    def log_subnet_dir(self, run_id: str, artifacts_dir: str | Path | None) -> str | None:
        """Upload a saved subnet directory (``runner.save_subnet``) under ``subnet/``; returns
        its ``runs:/`` URI, or None when there is none."""
        if artifacts_dir is None:
            return None
        artifacts_dir = Path(artifacts_dir)
        if not (artifacts_dir / "spec.json").is_file() or not (artifacts_dir / "weights.pt").is_file():
            raise ValueError(
                f"artifacts_dir {str(artifacts_dir)!r} must hold spec.json and weights.pt (runner.save_subnet)"
            )
        self.client.log_artifacts(run_id, str(artifacts_dir), SUBNET_DIR)
        return f"runs:/{run_id}/{SUBNET_DIR}"

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Write ``rows`` as an MLflow table artifact, *replacing* any previous version
        (``mlflow.log_table`` appends, which would duplicate rows on every update)."""
        self.write_table(run_id, rows, artifact_file)
        tags = self.table_tag(run_id, artifact_file)
        if tags:
            self.client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, tags[LOGGED_ARTIFACTS_TAG])

    def write_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Upload ``rows`` as ``artifact_file`` in the JSON layout of an MLflow table."""
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(artifact_file).name
            pd.DataFrame(rows).to_json(local, orient="split", index=False)
            self.client.log_artifact(run_id, str(local), posixpath.dirname(artifact_file) or None)

    def table_tag(self, run_id: str, artifact_file: str) -> dict[str, str]:
        """The ``mlflow.loggedArtifacts`` tag that makes ``artifact_file`` a table in the UI,
        when the run does not have it yet (``{}`` otherwise). A run this writer created has no
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


__all__ = [
    "FRONT_TAGS",
    "LAST_STEP_TAG",
    "MEMBER_TAG",
    "TRIAL_TAG",
    "RunWriter",
    "flatten_params",
    "git_sha",
    "library_versions",
    "numeric_metrics",
    "run_status",
]
