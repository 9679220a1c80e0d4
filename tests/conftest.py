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

# rayprune (torch) is imported by the fixtures that need it, not here: the xdist controller loads
# this file too, and runs no test.

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


#: Modules whose tests share one local Ray (``local_ray``): under xdist one worker runs them one
#: after another (:func:`pytest_xdist_make_scheduler`), so they pay one Ray start-up, and reuse the
#: task workers (teacher, baseline, fine-tunes, latency) it keeps warm, instead of one per module.
SHARED_RAY_MODULES = frozenset(
    f"tests/test_{name}.py" for name in ("sweep_interrupts", "orchestration_sweep", "front_mode", "traced_sweep")
)
SHARED_RAY_SCOPE = "shared-local-ray"


@pytest.fixture(scope="session")
def _shared_ray() -> Iterator[Callable[[], None]]:
    """Starts the shared local Ray (2 CPUs) when first asked, and shuts it down at the end."""
    import ray

    def start() -> None:
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    yield start
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(request: pytest.FixtureRequest, _shared_ray: Callable[[], None]) -> Iterator[None]:
    """A local Ray (2 CPUs) shared by the tests of a module in :data:`SHARED_RAY_MODULES`, and by
    those modules: a test may find it running when it starts, and leaves it running."""
    assert _module_path(request) in SHARED_RAY_MODULES, "add the module to SHARED_RAY_MODULES"
    _shared_ray()
    yield


@pytest.fixture(scope="module", autouse=True)
def _no_shared_ray_elsewhere(request: pytest.FixtureRequest) -> None:
    """Outside the shared modules no test finds the shared Ray running: they start their own
    Ray (fake GPUs, a cluster) or check that a command starts none."""
    if _module_path(request) not in SHARED_RAY_MODULES and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _module_path(request: pytest.FixtureRequest) -> str:
    return Path(request.node.path).relative_to(Path(__file__).parents[1]).as_posix()


@pytest.fixture
def make_ctx(tmp_path):
    """``make_ctx(**kw)``: :func:`rayprune.testing.tiny_context` in this test's tmp_path (or
    ``workdir=``)."""
    from rayprune.testing import tiny_context

    def make(workdir=None, **kw):
        return tiny_context(tmp_path if workdir is None else workdir, **kw)

    return make


@pytest.fixture
def tiny_spec():
    """The unpruned ``cifar_resnet:tiny`` spec with 4 classes and ``avgpool_conv`` shortcuts."""
    from rayprune.testing import tiny_spec as unpruned

    return unpruned()


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

    def cost(members: list[pytest.Item]) -> tuple[bool, int, int]:
        return (
            members[0].nodeid.split("::")[0] not in SHARED_RAY_MODULES,  # together, and first: the longest unit
            -sum(item.get_closest_marker("ray") is not None for item in members),
            -sum(item.get_closest_marker("slow") is not None for item in members),
        )

    items[:] = [item for members in sorted(by_module.values(), key=cost) for item in members]


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: `-p no:xdist` runs too
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, except that :data:`SHARED_RAY_MODULES` form one unit of work, so one
    worker runs them all against one local Ray."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRayScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return SHARED_RAY_SCOPE if module in SHARED_RAY_MODULES else module

    return SharedRayScheduling(config, log)


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
        self.copy_to(database)

    def copy_to(self, database: str | Path) -> None:
        """Writes the migrated template store to ``database`` (migrating the template first if
        no test has yet)."""
        with self.lock:
            if not self.template.exists():
                import sqlalchemy
                from mlflow.store.db import utils

                scratch = sqlalchemy.create_engine(f"sqlite:///{self.template}")
                try:
                    (self.migrate or utils._initialize_tables)(scratch)
                finally:
                    scratch.dispose()
        with closing(sqlite3.connect(self.template)) as source, closing(sqlite3.connect(database)) as target:
            source.backup(target)


@pytest.fixture(scope="session")
def _one_migration(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_OneMigration]:
    with pytest.MonkeyPatch.context() as patch:
        yield _OneMigration(patch, tmp_path_factory.mktemp("mlflow") / "template.db")


@pytest.fixture(scope="session")
def migrated_mlflow_store(_one_migration: _OneMigration) -> Callable[[Path], str]:
    """``seed(path)`` writes an empty MLflow SQLite store, already migrated, at ``path`` and
    returns its ``sqlite:///`` URI: for a process the test starts (a driver, a server) that
    would otherwise run every migration MLflow ships itself. It then finds a store, as its
    second sweep into one would."""

    def seed(path: Path) -> str:
        _one_migration.copy_to(path)
        return f"sqlite:///{path}"

    return seed


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
