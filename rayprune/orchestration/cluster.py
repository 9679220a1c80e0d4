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

No Ray and no MLflow imports: the CLI calls these before Ray starts.
"""

from __future__ import annotations

import json
import os
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


class LaunchError(RaypruneError):
    """A launch-path input that cannot work (exit status 2, one line)."""


# --------------------------------------------------------------------------------------------
# The head's MLflow server
# --------------------------------------------------------------------------------------------


def head_mlflow_server() -> dict[str, str] | None:
    """The head's MLflow server as ``launch/cluster.yaml`` recorded it (``uri``,
    ``backend_store_uri``), or None when this machine has no such record."""
    path = Path(os.path.expanduser(os.environ.get(HEAD_MLFLOW_ENV) or HEAD_MLFLOW_FILE))
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("uri"), str):
        return None
    return {"uri": info["uri"], "backend_store_uri": str(info.get("backend_store_uri") or "")}


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
    "package_repository",
    "resolve_space",
    "tracking_uri_on_cluster",
    "ui_base",
]
