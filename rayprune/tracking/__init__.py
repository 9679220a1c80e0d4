"""Tracking: the Parquet subnet registry, Pareto fronts, MLflow runs and operating points.

* :mod:`.pareto` -- pure Python/numpy fronts and their text tables (no MLflow), usable anywhere.
* :mod:`.store` -- ``subnets.parquet`` (pyarrow), one row per evaluated subnet.
* :mod:`.lookup` -- connecting to MLflow; finding an experiment, a sweep's parent run, its rows.
* :mod:`.mlflow_tracker` -- :class:`SweepTracker`, the sweep driver's only writer to MLflow and
  the store; it composes the parts below.
* :mod:`.mlflow_writer` -- the sweep's MLflow runs (parent, trials, fine-tunes) and every write to them.
* :mod:`.liveness` -- a driver's heartbeat on its parent run; finding and closing dead drivers' runs.
* :mod:`.publisher` -- the fronts, plot, registry and per-cell counts published to the parent run.
* :mod:`.plots` -- the fronts as a figure (matplotlib).
* :mod:`.mlflow_ui` -- the experiment tags and links that open MLflow's UI on the candidates (no MLflow import).
* :mod:`.model_registry` -- a picked subnet registered as an ONNX model under an alias.
* :mod:`.commands` -- what ``rayprune front`` / ``rayprune pick`` do (their parsers are in
  :mod:`rayprune.cli`; the export itself is :mod:`rayprune.export`).

This is the only package that imports mlflow: ``lookup``, ``mlflow_writer``, ``liveness`` and
``model_registry`` do, and ``mlflow_tracker``, ``publisher`` and ``commands`` through them.
Everything but the numpy-only Pareto functions is imported lazily here (mlflow, pyarrow and
torch take seconds to import).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RaypruneError

if TYPE_CHECKING:  # the real classes for the type checker; at run time they load lazily (__getattr__)
    from .mlflow_tracker import SweepTracker
    from .store import SubnetStore

SQLITE_PREFIX = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, absolute (a relative one against the
    working directory, as MLflow opens it; ``~`` expanded), or None for any other URI."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = Path(os.path.expanduser(uri[len(SQLITE_PREFIX) :]))
    return path if path.is_absolute() else Path.cwd() / path


class TrackingError(RaypruneError):
    """A tracking/export problem the user can fix; the message names it and the fix.
    CLIs print it as one ``rayprune: error: ...`` line and exit non-zero."""


@contextlib.contextmanager
def mlflow_errors() -> Iterator[None]:
    """The tracking boundary of a command: an error MLflow raises (a store or server that refuses
    a request, a name it does not know) becomes a :class:`TrackingError` with MLflow's message.
    Also a decorator."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise TrackingError(str(e)) from e


from .pareto import hypervolume_2d, pareto_front, pareto_ranks  # noqa: E402  # submodules import TrackingError (above)

_LAZY = {"SubnetStore": "store", "SweepTracker": "mlflow_tracker"}

__all__ = [
    "SubnetStore",
    "SweepTracker",
    "TrackingError",
    "hypervolume_2d",
    "mlflow_errors",
    "pareto_front",
    "pareto_ranks",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
