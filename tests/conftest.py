"""Shared fixtures and the ``slow``/``ray`` markers (registered in pyproject.toml).

``pytest -m "not slow"`` (``make test-fast``) is the fast subset to run while working; ``make test``
runs everything. A test module marks its own slow tests with ``@pytest.mark.slow``; a test using a
fixture that starts Ray is marked ``ray`` and ``slow`` here.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from rayprune.testing import tiny_context
from rayprune.testing import tiny_spec as _tiny_spec

#: Fixtures that start Ray: a test using one is marked ``ray`` (and ``slow``).
RAY_FIXTURES = {"local_ray", "ray_head"}

# Every Ray the tests start (local ones, the test cluster's nodes, `ray start` in a subprocess)
# keeps its idle workers for the module's sweeps: by default Ray kills a worker idle for a second
# once there are more workers than CPUs (a sweep's trial actors push the count over), so each
# sweep's teacher, baseline, fine-tune and latency tasks imported torch again in new workers
# (about 3 CPU seconds each), and it prestarts workers that then never run anything. What the
# workers run is unchanged: only how often Ray starts one. (Environment variables: Ray reads
# ``RAY_<setting>`` when a node starts, and the processes the tests start inherit them.)
for _setting, _value in {
    "RAY_num_workers_soft_limit": "4",
    "RAY_idle_worker_killing_time_threshold_ms": "600000",
    "RAY_enable_worker_prestart": "0",
}.items():
    os.environ.setdefault(_setting, _value)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray (2 CPUs) shared by the tests of one module: one start-up, and the task
    workers it keeps warm, instead of one per test."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def make_ctx(tmp_path):
    """``make_ctx(**kw)``: :func:`rayprune.testing.tiny_context` in this test's tmp_path (or
    ``workdir=``)."""

    def make(workdir=None, **kw):
        return tiny_context(tmp_path if workdir is None else workdir, **kw)

    return make


@pytest.fixture
def tiny_spec():
    """The unpruned ``cifar_resnet:tiny`` spec with 4 classes and ``avgpool_conv`` shortcuts."""
    return _tiny_spec()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        longest_modules_first(items)


# --------------------------------------------------------------------------------------------
# Parallel runs (pytest-xdist; `make test`: -n 2 --dist loadfile --no-loadscope-reorder)
# --------------------------------------------------------------------------------------------


def longest_modules_first(items: list[pytest.Item]) -> None:
    """Orders whole modules (a module stays in one piece, so its module-scoped fixtures are built
    once) with the likely longest first: those with the most Ray tests (sweeps), then the most
    slow ones. With --dist loadfile a worker takes one module at a time in this order, so no
    long module starts last while the other worker idles. Every worker computes the same order."""
    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::")[0], []).append(item)

    def cost(members: list[pytest.Item]) -> tuple[int, int]:
        return (
            -sum(item.get_closest_marker("ray") is not None for item in members),
            -sum(item.get_closest_marker("slow") is not None for item in members),
        )

    items[:] = [item for members in sorted(by_module.values(), key=cost) for item in members]


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist each worker computes with one torch thread: two workers on two cores with two
    threads each would oversubscribe the cores (spinning OpenMP threads slow everything)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# One MLflow schema migration per session
# --------------------------------------------------------------------------------------------


class _OneMigration:
    """Replaces MLflow's table initializer for a fresh store: an SQLite file gets a copy of a
    template store, migrated once on first use, instead of running every migration itself."""

    def __init__(self, patch: pytest.MonkeyPatch, template: Path) -> None:
        self.patch, self.template, self.lock = patch, template, threading.Lock()
        self.installed = False
        self.migrate: Callable[[Any], None] | None = None

    def install(self) -> None:
        from mlflow.store.db import utils
        from mlflow.store.model_registry import sqlalchemy_store as registry_store

        self.migrate = utils._initialize_tables
        self.patch.setattr(utils, "_initialize_tables", self.initialize)
        self.patch.setattr(registry_store, "_initialize_tables", self.initialize)
        self.installed = True

    def initialize(self, engine: Any) -> None:
        assert self.migrate is not None
        database = engine.url.database
        if engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
            self.migrate(engine)
            return
        with self.lock:
            if not self.template.exists():
                import sqlalchemy

                scratch = sqlalchemy.create_engine(f"sqlite:///{self.template}")
                try:
                    self.migrate(scratch)
                finally:
                    scratch.dispose()
        with closing(sqlite3.connect(self.template)) as source, closing(sqlite3.connect(database)) as target:
            source.backup(target)


@pytest.fixture(scope="session")
def _one_migration(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_OneMigration]:
    with pytest.MonkeyPatch.context() as patch:
        yield _OneMigration(patch, tmp_path_factory.mktemp("mlflow") / "template.db")


@pytest.fixture(autouse=True)
def one_mlflow_migration_per_session(_one_migration: _OneMigration) -> None:
    """A fresh MLflow SQLite store runs every schema migration MLflow ships (seconds on 2 cores, far
    more on a loaded machine), and this suite creates dozens of stores in its own process. Each one
    gets a copy of a store migrated once instead: the same tables at the same schema revision, so
    rayprune's code runs exactly as against a store MLflow built itself, and a store is still
    created only where MLflow would create one. Processes the tests start (servers, drivers, Ray
    workers) migrate as usual. Installed once MLflow is imported: a session without it never loads it."""
    if "mlflow" in sys.modules and not _one_migration.installed:
        _one_migration.install()
