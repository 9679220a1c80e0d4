"""The launch path on a Ray cluster: what the sweep driver decides from where it runs.

``launch/cluster.yaml`` starts an MLflow tracking server on the head node (bound to 127.0.0.1,
reached from outside by port forwarding) and records it in ``~/.rayprune/mlflow_server.json``
(``{"uri": "http://127.0.0.1:5000", "backend_store_uri": "sqlite:////home/ubuntu/mlflow.db"}``).
A driver that joins the cluster (``--address``) on the head reads that file:

* :func:`tracking_uri_on_cluster`: with no ``--mlflow-uri``, a sweep file whose store is the
  server's own SQLite file (the shipped files say ``sqlite:///mlflow.db``, which in the head's
  home *is* that file) logs through the server instead, so the experiment gets the server's
  artifact destination (S3 on AWS), not a head-local path; ``--mlflow-uri`` naming that file is
  refused; any other store (another SQLite file, a server) is used as given.
* :func:`resolve_space`: ``--space`` expanded by the user's shell on another machine
  (``/home/alice/rayprune/search_spaces/X.yaml`` on a head whose home is ``/home/ubuntu``) falls
  back, with a warning, to the same ``search_spaces/...`` file of the installed package's
  repository.
* :func:`browse_hint`: how to look at the runs: ``mlflow ui`` on a SQLite store; the server's URL
  and the port-forward command for an HTTP one; the links (:mod:`rayprune.tracking.mlflow_ui`).
* :func:`wait_for_tracking_server`: a joined driver gives a server that refuses connections a
  bounded time to start (``ray submit`` right after ``ray up``), and its final error names the
  cluster's server and how to look at it, never advice to start another one.
* :func:`outside_package_folder`: ``ray job submit --working-dir`` runs the driver in a copy of
  that folder in Ray's temporary package cache (``.../_ray_pkg_<hash>``), deleted with the Ray
  session; a tracking store or storage path there defaults to the head's server and the
  cluster's storage path (else ``~/ray_results``), or is refused when no server is known.

No Ray and no MLflow imports: the CLI calls these before Ray starts.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from ..errors import RaypruneError
from ..tracking import sqlite_file
from ..tracking.mlflow_ui import candidates_link, runs_link, ui_base

#: Where ``launch/cluster.yaml``'s head start commands describe the head's MLflow server.
HEAD_MLFLOW_FILE = "~/.rayprune/mlflow_server.json"
#: Overrides :data:`HEAD_MLFLOW_FILE` (tests; a head set up by other means).
HEAD_MLFLOW_ENV = "RAYPRUNE_HEAD_MLFLOW_FILE"
#: The repository folder of the shipped sweep files.
SPACES_DIR = "search_spaces"
#: The port-forward command of the head's MLflow server, for a PORT.
PORT_FORWARD = "ray attach launch/cluster.yaml -p {port}   (or: ssh -N -L {port}:127.0.0.1:{port} HEAD)"
#: How long a driver joining a cluster waits for a tracking server that refuses connections.
SERVER_WAIT_S = 30.0
#: Overrides :data:`SERVER_WAIT_S` (seconds).
SERVER_WAIT_ENV = "RAYPRUNE_TRACKING_WAIT_S"
#: How to look at the head's MLflow server (``launch/cluster.yaml`` logs it to ``~/mlflow.log``).
SERVER_LOG_COMMAND = "ray exec launch/cluster.yaml 'tail ~/mlflow.log'"
#: The name prefix of the folders of Ray's runtime-env package cache (a job's ``--working-dir``).
RAY_PACKAGE_PREFIX = "_ray_pkg_"
#: Where a driver in a package folder keeps its results when the cluster names no storage path.
HOME_STORAGE = "~/ray_results"


class LaunchError(RaypruneError):
    """A launch-path input that cannot work (exit status 2, one line)."""


# --------------------------------------------------------------------------------------------
# The head's MLflow server
# --------------------------------------------------------------------------------------------


def head_mlflow_server() -> dict[str, str] | None:
    """The head's MLflow server as ``launch/cluster.yaml`` recorded it (``uri``,
    ``backend_store_uri``, and the cluster's shared ``storage_path``, empty when not recorded),
    or None when this machine has no such record."""
    path = Path(os.path.expanduser(os.environ.get(HEAD_MLFLOW_ENV) or HEAD_MLFLOW_FILE))
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("uri"), str):
        return None
    return {
        "uri": info["uri"],
        "backend_store_uri": str(info.get("backend_store_uri") or ""),
        "storage_path": str(info.get("storage_path") or ""),
    }


def tracking_uri_on_cluster(file_uri: str, cli_uri: str | None, address: str | None) -> tuple[str, str | None]:
    """The tracking URI a sweep uses, and a note to print when it is not the one configured.

    ``file_uri`` is the sweep file's ``tracking.uri``, ``cli_uri`` the ``--mlflow-uri`` (None
    when not given), ``address`` the ``--address`` (None: a local Ray, nothing changes). Raises
    :class:`LaunchError` for an explicit ``--mlflow-uri`` that is the head server's database.
    """
    uri = cli_uri or file_uri
    if address is None:
        return uri, None
    server = head_mlflow_server()
    if server is None:
        return uri, None
    own, mine = sqlite_file(server["backend_store_uri"]), sqlite_file(uri)
    if own is None or mine is None or own.resolve() != mine.resolve():
        return uri, None
    if cli_uri is not None:
        raise LaunchError(
            f"--mlflow-uri {cli_uri} is the database of the MLflow server this cluster's head runs "
            f"({server['uri']}); writing it directly puts artifacts on the head's disk: pass "
            f"--mlflow-uri {server['uri']} (or another database)"
        )
    return server["uri"], (
        f"rayprune: this cluster's head runs an MLflow server at {server['uri']}; the sweep logs "
        f"there instead of its database {file_uri} (pass --mlflow-uri to choose another store)"
    )


# --------------------------------------------------------------------------------------------
# A tracking server that is still starting
# --------------------------------------------------------------------------------------------


def wait_for_tracking_server(uri: str, address: str | None, wait_s: float | None = None) -> None:
    """On a joined cluster (``address`` given), give an HTTP tracking server that refuses
    connections ``wait_s`` seconds (:data:`SERVER_WAIT_S`, or ``$RAYPRUNE_TRACKING_WAIT_S``) to
    start, saying so once on stderr. Raises :class:`LaunchError` naming the cluster's server and
    how to look at it when it still cannot be reached. Anything else returns at once."""
    parsed = urlparse(uri)
    if address is None or parsed.scheme not in ("http", "https") or parsed.hostname is None:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    wait_s = float(os.environ.get(SERVER_WAIT_ENV, SERVER_WAIT_S)) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            socket.create_connection((parsed.hostname, port), timeout=3.0).close()
            return
        except ConnectionRefusedError as e:
            if time.monotonic() >= deadline:
                raise _unreachable(uri, e, wait_s) from None
            if not said:
                print(
                    f"rayprune: the MLflow server at {uri} refuses connections (it may still be starting); "
                    f"waiting up to {wait_s:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            time.sleep(0.5)
        except OSError as e:  # no such host, a timeout: waiting would not help
            raise _unreachable(uri, e, None) from None


def _unreachable(uri: str, error: OSError, waited_s: float | None) -> LaunchError:
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    after = f" after waiting {waited_s:g} s" if waited_s is not None else ""
    server = head_mlflow_server()
    if server is None:
        whose = "launch/cluster.yaml starts the cluster's server on the head, at http://127.0.0.1:5000"
    elif server["uri"].rstrip("/") == uri.rstrip("/"):
        whose = "it is the server `ray up` started on this cluster's head"
    else:
        whose = f"this cluster's head runs its server at {server['uri']}"
    return LaunchError(
        f"cannot reach the MLflow tracking server at {uri} ({reason}){after}; {whose}: look at its log "
        f"with {SERVER_LOG_COMMAND} and restart it with `ray up launch/cluster.yaml --restart-only`, "
        "or pass a reachable --mlflow-uri"
    )


# --------------------------------------------------------------------------------------------
# A driver in Ray's temporary package folder (ray job submit --working-dir)
# --------------------------------------------------------------------------------------------


def ray_package_folder(cwd: Path | None = None) -> Path | None:
    """The folder of Ray's package cache the driver runs in (``cwd`` or a parent of it named
    ``_ray_pkg_*``), or None."""
    here = (cwd or Path.cwd()).resolve()
    return next((folder for folder in (here, *here.parents) if folder.name.startswith(RAY_PACKAGE_PREFIX)), None)


def outside_package_folder(
    tracking_uri: str, storage_path: str, cli_uri: str | None, cli_storage: str | None
) -> tuple[str, str, str | None]:
    """The tracking URI and storage path a sweep uses, and a note to print when they changed.

    Outside a package folder (:func:`ray_package_folder`) both stay as they are. Inside one, a
    store or storage path that the sweep file put there (its relative defaults) is replaced by
    the head's MLflow server and the cluster's storage path (:func:`head_mlflow_server`; else
    ``~/ray_results`` on this node, the head, where job drivers run). Raises
    :class:`LaunchError` when a flag names a place inside the folder, or when the store would
    be there and no head server is known.
    """
    folder = ray_package_folder()
    if folder is None:
        return tracking_uri, storage_path, None
    db, results = sqlite_file(tracking_uri), None if "://" in storage_path else Path(storage_path)
    uri_inside = db is not None and db.resolve().is_relative_to(folder)
    storage_inside = results is not None and results.resolve().is_relative_to(folder)
    if not (uri_inside or storage_inside):
        return tracking_uri, storage_path, None
    server = head_mlflow_server()
    given = (cli_uri is not None and uri_inside) or (cli_storage is not None and storage_inside)
    if given or (uri_inside and server is None):
        raise LaunchError(
            f"this sweep runs in Ray's temporary package folder {folder} (ray job submit --working-dir), which "
            f"Ray deletes with the session, and would keep its {_what(uri_inside, storage_inside)} there"
            f"{'' if given else ' (no MLflow server of this cluster is recorded in ' + HEAD_MLFLOW_FILE + ')'}"
            ": pass --mlflow-uri (the head's server, http://127.0.0.1:5000, or sqlite:////abs/path/mlflow.db "
            "outside that folder) and --storage-path (s3://BUCKET/rayprune/ray_results or a shared folder)"
        )
    uri = server["uri"] if uri_inside and server is not None else tracking_uri
    storage = storage_path
    if storage_inside:
        storage = (server or {}).get("storage_path") or os.path.expanduser(HOME_STORAGE)
    return (
        uri,
        storage,
        (
            f"rayprune: this sweep runs in Ray's temporary package folder {folder}, which Ray deletes with the "
            f"session: it logs to {uri} and stores its results in {storage} instead (pass --mlflow-uri / "
            "--storage-path to choose)"
        ),
    )


def _what(uri_inside: bool, storage_inside: bool) -> str:
    names = [name for name, inside in (("MLflow database", uri_inside), ("results", storage_inside)) if inside]
    return " and ".join(names)


# --------------------------------------------------------------------------------------------
# --space
# --------------------------------------------------------------------------------------------


def package_repository() -> Path:
    """The folder holding the installed ``rayprune`` package (its repository in an editable
    install, as ``launch/cluster.yaml`` makes on every node)."""
    return Path(__file__).resolve().parents[2]


def resolve_space(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``path`` as given, unless it does not exist and the installed package's repository has
    the file at its ``search_spaces/...`` tail: then that file, and a warning saying so."""
    given = Path(path)
    if given.exists():
        return given, None
    parts = given.parts
    if SPACES_DIR not in parts[:-1]:
        return given, None
    tail = parts[len(parts) - 1 - parts[::-1].index(SPACES_DIR) :]  # from the last search_spaces/ on
    candidate = package_repository().joinpath(*tail)
    if not candidate.is_file():
        return given, None
    return candidate, (
        f"rayprune: warning: --space {path}: no such file on this machine; using {candidate} (the "
        "installed package's copy). A path your own shell expanded (~) names your home, not the "
        "head's: pass it relative to the head's home, quoted"
    )


# --------------------------------------------------------------------------------------------
# Browsing the runs
# --------------------------------------------------------------------------------------------


def browse_hint(tracking_uri: str, experiment_id: str) -> str:
    """What to run and open to browse a sweep's runs (several lines, no trailing newline): the
    fine-tuned candidates' saved view and every run, both in MLflow's model-training mode."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        lines = [f"Browse the runs: the MLflow server at {ui_base(tracking_uri)}"]
        if parsed.hostname in ("127.0.0.1", "localhost", "::1"):
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            lines.append(f"  from another machine, forward its port first: {PORT_FORWARD.format(port=port)}")
    else:
        lines = [f"Browse the runs: mlflow ui --backend-store-uri {tracking_uri}"]
    lines.append(
        f"  then open the fine-tuned candidates with their metrics, sorted by MACs: "
        f"{candidates_link(tracking_uri, experiment_id)}"
    )
    lines.append(f"  every run of the experiment: {runs_link(tracking_uri, experiment_id)}")
    return "\n".join(lines)


__all__ = [
    "HEAD_MLFLOW_ENV",
    "HEAD_MLFLOW_FILE",
    "LaunchError",
    "browse_hint",
    "head_mlflow_server",
    "outside_package_folder",
    "package_repository",
    "ray_package_folder",
    "resolve_space",
    "tracking_uri_on_cluster",
    "ui_base",
    "wait_for_tracking_server",
]
