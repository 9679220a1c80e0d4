"""Test helpers that ship with the package (pure torch, no pytest needed to import them).

* :func:`tiny_context`: a seconds-long :class:`~rayprune.methods.RunContext` on the tiny preset.
* :mod:`rayprune.testing.conformance`: the method contract every registered method passes; a
  third-party method runs it from its own tests (as Optuna ships its sampler conformance suite)::

      from rayprune.testing import conformance
      @pytest.mark.parametrize("check", conformance.CHECKS)
      def test_my_method(check, tmp_path):
          check(MyMethod, tmp_path)
"""

from __future__ import annotations

from .context import tiny_context, tiny_spec

__all__ = ["tiny_context", "tiny_spec"]
