"""Shared fixtures and the ``slow``/``ray`` markers (registered in pyproject.toml).

``pytest -m "not slow"`` is the fast subset to run while working; ``make test`` runs everything.
"""

from __future__ import annotations

import pytest

from rayprune.testing import tiny_context, tiny_spec as _tiny_spec

#: Fixtures that start Ray: a test using one is marked ``ray`` (and ``slow``).
RAY_FIXTURES = {"local_ray", "ray_head"}
#: Slow tests (several seconds each on 2 CPU cores) in modules that carry no markers of their
#: own; the other test modules mark theirs with ``@pytest.mark.slow``.
SLOW_NODES = (
    "tests/test_orchestration_cache.py::",
    "tests/test_orchestration_config.py::test_launch_script_runs_alone_like_ray_submit_copies_it",
    "tests/test_gpu_kit.py::test_smoke_runs_every_stage_and_records_meta",
    "tests/test_tracking_export.py::test_default_export_writes_all_files_and_onnx_matches_torch",
    "tests/test_tracking_mlflow.py::test_pick_exports_registers_an_onnx_model_that_pyfunc_loads",
)


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


def pytest_collection_modifyitems(items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
        elif item.nodeid.startswith(SLOW_NODES):
            item.add_marker(pytest.mark.slow)
