"""Finding a sweep in MLflow: connecting to the tracking store, the experiment, a sweep's parent
run, its subnet rows and a saved subnet's files.

What ``rayprune front`` / ``pick`` read and what :class:`~.mlflow_tracker.SweepTracker` writes
share the layout names here (the parent run's role and sweep-id tags, ``subnets.parquet``).
Every problem a user can fix (an unreachable server, a missing database, an unknown
experiment, a sweep with no front yet) is one :class:`~rayprune.tracking.TrackingError` line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from . import SQLITE_PREFIX, TrackingError, sqlite_file
from .store import SubnetStore

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "rayprune.role"
SWEEP_TAG = "rayprune.sweep_id"
SUBNETS_ARTIFACT = "subnets.parquet"
_PROBE_TIMEOUT_S = 3.0
#: How long opening a SQLite store waits while another process (a sweep driver starting up)
#: is still creating or migrating its tables.
BUSY_WAIT_S = 30.0

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
    path = sqlite_file(uri)
    return f"{SQLITE_PREFIX}{path}" if path is not None else uri


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
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}); start it "
                "(mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000) or pass a "
                "reachable --mlflow-uri / MLFLOW_TRACKING_URI"
            ) from None
    elif (path := sqlite_file(uri)) is not None:
        if must_exist and not path.is_file():
            raise TrackingError(
                f"no MLflow database at {path}; run a sweep in that directory first or pass "
                "--mlflow-uri (e.g. sqlite:////abs/path/mlflow.db or http://host:5000)"
            )
        if not path.parent.is_dir():
            raise TrackingError(
                f"the directory of the MLflow database {path} does not exist; create it or pass another --mlflow-uri"
            )
        check_sqlite_file(path, must_exist=must_exist)


SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLES = {"experiments", "runs"}


def check_sqlite_file(path: Path, *, must_exist: bool = False) -> None:
    """Refuse, before MLflow connects, a file it would fail on or write into: anything that is not
    an SQLite database (MLflow's traceback would come after Ray started), and an SQLite database
    without MLflow's tables, unless it is empty and the caller writes (``must_exist`` False: a
    sweep creates the schema). A reader (``front``, ``pick``) never creates MLflow's schema in an
    empty file. Opens the file without creating it and only reads; SQLite may write once: a
    writer killed mid-transaction (a SIGKILLed driver) leaves a hot journal, which the first
    reader rolls back (a read-only connection cannot, and fails: "attempt to write a readonly
    database"), as MLflow's own connection would right after."""
    fix = (
        "pass --mlflow-uri with the sweep's database (e.g. sqlite:////abs/path/mlflow.db) or its server "
        "(http://host:5000)"
    )
    if not path.exists():
        return
    if not path.is_file():
        raise TrackingError(f"the MLflow database {path} is a directory, not a file; {fix}")
    size = path.stat().st_size
    if size == 0:
        if must_exist:
            raise TrackingError(
                f"the MLflow database {path} is empty (0 bytes), so no sweep was logged there; "
                f"delete it or run a sweep there first, or {fix}"
            )
        return
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise TrackingError(
            f"{path} is not an SQLite database (tracking URI sqlite:///{path}); pass a new file name or {fix}"
        )
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as e:
        raise TrackingError(f"cannot read the SQLite database {path} ({e}); {fix}") from None
    if tables >= MLFLOW_TABLES or (not tables and not must_exist):
        return
    names = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
    what = "has no tables" if not tables else f"holds other tables ({names})"
    raise TrackingError(f"the SQLite database {path} {what}, not MLflow's; {fix}")


def connect(uri: str | None = None, *, must_exist: bool = False) -> MlflowClient:
    """A tracking + registry client for ``uri`` (see :func:`resolve_tracking_uri`), after
    :func:`check_reachable` and, for a server, one API call that must succeed first time.
    Turns MLflow's per-download progress bars and run URLs off unless set (``QUIET_MLFLOW``)."""
    uri = resolve_tracking_uri(uri)
    check_reachable(uri, must_exist=must_exist)
    for key, value in QUIET_MLFLOW.items():
        os.environ.setdefault(key, value)
    client = _open_client(uri)
    if urlparse(uri).scheme in ("http", "https"):
        _check_answers(client)
    return client


def _open_client(uri: str) -> MlflowClient:
    """``MlflowClient(uri)``. Opening a SQLite store brings its tables to MLflow's schema, so
    opening one that a starting sweep driver is creating at that moment collides with the
    driver's own migration (sqlalchemy ``OperationalError``). Wait up to :data:`BUSY_WAIT_S` for
    the driver to finish, then say what happened in one line."""
    from sqlalchemy.exc import OperationalError

    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        try:
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        except OperationalError as e:
            if time.monotonic() >= deadline:
                detail = str(e.orig if e.orig is not None else e).strip().splitlines()[0]
                raise TrackingError(
                    f"the MLflow database {sqlite_file(uri) or uri} stayed busy for {BUSY_WAIT_S:g} s "
                    f"({detail}): another process is creating or writing it; try again when it "
                    "is done"
                ) from None
            time.sleep(0.5)


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
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(
            f"the tracking server at {client.tracking_uri} did not answer as an MLflow server "
            f"({detail}); check --mlflow-uri / MLFLOW_TRACKING_URI and credentials"
        ) from None


# --------------------------------------------------------------------------------------------
# Looking up
# --------------------------------------------------------------------------------------------


def find_experiment(client: MlflowClient, name: str) -> str:
    """The id of the active experiment ``name``; :class:`TrackingError` listing the known ones."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments(max_results=50))
        state = "is deleted" if experiment is not None else "does not exist"
        raise TrackingError(
            f"experiment {name!r} {state} at {client.tracking_uri}; known experiments: "
            f"{', '.join(known) or '(none)'}; pass --experiment NAME (and --mlflow-uri)"
        )
    return experiment.experiment_id


def find_sweep_run(client: MlflowClient, experiment_id: str, sweep_id: str | None = None) -> Any:
    """The parent run of sweep ``sweep_id`` in the experiment, or its newest sweep."""
    query = f"tags.`{ROLE_TAG}` = 'sweep'"
    if sweep_id is not None:
        query += f" and tags.`{SWEEP_TAG}` = '{_quoted(sweep_id)}'"
    runs = client.search_runs(
        [experiment_id],
        filter_string=query,
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        which = f"sweep {sweep_id!r}" if sweep_id is not None else "any sweep"
        name = client.get_experiment(experiment_id).name
        raise TrackingError(
            f"experiment {name!r} has no parent run of {which}; run `rayprune sweep` "
            "first (or check --experiment / --sweep-id)"
        )
    return runs[0]


def sweep_rows(client: MlflowClient, run: Any) -> list[dict[str, Any]]:
    """The subnet registry rows logged to a sweep's parent run (``subnets.parquet``)."""
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    sweep = run.data.tags.get(SWEEP_TAG, run.info.run_id)
    if SUBNETS_ARTIFACT not in names:
        raise TrackingError(
            f"sweep {sweep!r} has no Pareto front yet (no trial has finished); wait for a "
            "trial to finish or resume the sweep"
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run.info.run_id, SUBNETS_ARTIFACT, tmp)
        return SubnetStore(local).rows()


def download_subnet(client: MlflowClient, artifact_uri: str, dst: str | Path) -> Path:
    """Download a saved subnet directory (``runs:/<run>/subnet``) into ``dst``."""
    try:
        return Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=client.tracking_uri))
    except (MlflowException, OSError) as e:
        raise TrackingError(
            f"cannot download the subnet weights at {artifact_uri}: {str(e).splitlines()[0]}; "
            "was the artifact store moved or deleted?"
        ) from None


def _quoted(value: str) -> str:
    if "'" in value or "`" in value:
        raise TrackingError(f"ids may not contain quotes or backticks: {value!r}")
    return value
