"""Every registered method passes the shared contract (rayprune.testing.conformance) on the
tiny preset on CPU in seconds."""

from __future__ import annotations

import pytest

from rayprune.methods import MODULES, get_method
from rayprune.testing import conformance

SLOW_CHECKS = {conformance.check_finalize_reports_true_macs}  # a fine-tune, robust accuracy and latency
CHECKS = [
    pytest.param(c, id=c.__name__.removeprefix("check_"), marks=[pytest.mark.slow] if c in SLOW_CHECKS else [])
    for c in conformance.CHECKS
]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", list(MODULES))
def test_method_conforms(name, check, tmp_path):
    check(get_method(name), tmp_path)
