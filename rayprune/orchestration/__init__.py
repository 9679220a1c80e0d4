"""Orchestration: sweeps on Ray Tune with per-cell Optuna budgets (the only package importing
ray and optuna).

* :mod:`.config` -- the sweep file schema (``search_spaces/*.yaml``): ``load_sweep(path)``.
* :mod:`.search` -- ``CellSearcher`` (seeded Optuna studies, one per method x KD weight shared
  across the FLOPs targets, choosing the per-stage budgets in batch-synchronous rounds) and
  ``PerCellASHA``.
* :mod:`.trainable` -- ``run_tune_trial``: one method run as a Tune trial (reports and
  checkpoints after every step; never touches MLflow).
* :mod:`.trial_spec` -- ``TrialSpec``: what the driver hands a trial (Tune's config dict),
  parsed once at each entry point and read by attribute.
* :mod:`.sweep` -- the driver: ``main(argv)`` for ``rayprune sweep`` / ``launch/sweep.py``,
  ``run_sweep(cfg)``; its Tune callback is the only writer to the tracking store.

Nothing is imported here: ``import ray`` takes seconds, and ``rayprune --help`` should not.
"""
