"""Shared fixtures and the ``slow``/``ray`` markers (registered in pyproject.toml).

``pytest -m "not slow"`` is the fast subset to run while working; ``make test`` runs everything.
"""

from __future__ import annotations

import pytest

from rayprune.testing import tiny_context
from rayprune.testing import tiny_spec as _tiny_spec

#: Fixtures that start Ray: a test using one is marked ``ray`` (and ``slow``).
RAY_FIXTURES = {"local_ray", "ray_head"}
#: Slow tests (several seconds each on 2 CPU cores) in modules that carry no markers of their
#: own; the other test modules mark theirs with ``@pytest.mark.slow``.


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
