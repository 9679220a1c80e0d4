"""Tracking: the Parquet subnet registry, Pareto fronts, MLflow runs, export and operating points.

* :mod:`.pareto` -- pure Python/numpy fronts and their text tables (no MLflow), usable anywhere.
* :mod:`.store` -- ``subnets.parquet`` (pyarrow), one row per evaluated subnet.
* :mod:`.lookup` -- connecting to MLflow; finding an experiment, a sweep's parent run, its rows.
* :mod:`.mlflow_tracker` -- :class:`SweepTracker`, the sweep driver's only writer to MLflow.
* :mod:`.plots` -- the fronts as a figure (matplotlib).
* :mod:`.model_registry` -- a picked subnet registered as an ONNX model under an alias.
* :mod:`.export` -- spec.json + weights.pt + ONNX + model card for a chosen subnet.
* :mod:`.cli` -- ``rayprune front`` / ``rayprune pick``.

This is the only package that imports mlflow: ``lookup``, ``mlflow_tracker``,
``model_registry`` and ``cli``.
Everything but the numpy-only Pareto functions is imported lazily here (mlflow, pyarrow and
torch take seconds to import).
"""

from __future__ import annotations

from typing import Any


class TrackingError(RuntimeError):
    """A tracking/export problem the user can fix; the message names it and the fix.
    CLIs print it as one ``rayprune: error: ...`` line and exit non-zero."""


from .pareto import hypervolume_2d, pareto_front, pareto_ranks  # noqa: E402

_LAZY = {"SubnetStore": "store", "SweepTracker": "mlflow_tracker", "export_subnet": "export", "front_main": "cli",
         "pick_main": "cli"}

__all__ = ["TrackingError", "SubnetStore", "SweepTracker", "export_subnet", "front_main", "hypervolume_2d",
           "pareto_front", "pareto_ranks", "pick_main"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
