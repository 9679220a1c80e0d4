"""The Ray Tune function trainable: one trial = one method run (one cell, one budget).

A trial builds its method with :func:`rayprune.runner.build_method` and runs it with the trial
driver that ``rayprune run`` uses too (:func:`rayprune.runner.drive`: step -> checkpoint ->
report): after every step it ``tune.report``\\ s the step's metrics and subnet records together
with a checkpoint (``state.pt``, a :class:`~rayprune.runner.TrialState`). A retried or resumed
trial continues from ``tune.get_checkpoint()``. At the end it trains the chosen subnet
(``method.best()``) like ``finalize`` does, with the sweep's *search* recipe, through the sweep's
:class:`~.cache.FinalCache`: a subnet another trial of the cell already trained with that recipe
is reused, not trained again (its record says so: ``source["reused_from"]``), and the cached
val_top1 is what Optuna is told. It reports the final record with ``final=True``, plus a
checkpoint holding ``final/`` (spec.json, weights.pt, metrics.json).

Subnet records travel as JSON strings (``subnets``, ``best``, ``final_record``) so that Ray's
result loggers keep them as one value. The trainable never touches MLflow: the driver's
callback is the only writer to the tracking store.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from .. import models
from ..grid import TargetWindow
from ..methods import Method, StepResult, SubnetRecord
from ..methods.base import stage_rates
from ..runner import STATE_FILE, TrialState, build_method, drive, restore, save_subnet
from .cache import FinalCache
from .final_phase import final_phase
from .storage import localize
from .trial_spec import FINAL_KEY, METRIC, TrialSpec

FINAL_DIR = "final"


def run_tune_trial(config: dict[str, Any]) -> None:
    """The function Tune runs for each trial (see the module docstring); ``config`` is parsed
    into a :class:`~.trial_spec.TrialSpec` once, here."""
    spec = TrialSpec.from_config(config)
    torch.set_num_threads(max(1, int(spec.cpus_per_trial)))
    cfg = spec.trial_config()
    workdir = Path(tune.get_context().get_trial_dir()) / "work"
    if cfg.teacher is not None:
        cfg = cfg.model_copy(update={"teacher": localize(cfg.teacher, workdir / "teacher")})
    method = build_method(cfg, workdir)
    unpruned = models.macs(method.ctx.spec, method.ctx.input_size)
    state = _restore(method)

    def report(result: StepResult, state: TrialState, checkpoint_dir: Path) -> None:
        _report_step(method, result, state.steps, unpruned, spec, checkpoint_dir)

    drive(method, state, report, max_steps=cfg.max_steps, checkpoint_dir=tempfile.TemporaryDirectory)
    cache = FinalCache(spec.final_cache) if spec.final_cache else None
    record, weights = final_phase(method, cache, spec.cell, tune.get_context().get_trial_id())
    record.source["window"] = TargetWindow(spec.flops_target * unpruned).record(record.macs)
    record.source.update(budget_record(method.ctx.spec, record.spec, spec.allocation))
    _report_final(method, record, weights, state, unpruned, spec)


def budget_record(full_spec: models.Spec, spec: models.Spec, allocation: Sequence[float] | None) -> dict[str, Any]:
    """What a trial's final record says about its budget: the realised per-stage rates of its
    subnet, and the allocation proposed to it, if any (its own, also when the subnet's training
    was reused from another trial)."""
    record: dict[str, Any] = {"stage_rates": stage_rates(full_spec, spec)}
    if allocation is not None:
        record["allocation"] = list(allocation)
    return record


def _restore(method: Method) -> TrialState:
    """The trial state from Tune's checkpoint (loaded into ``method``), else a fresh one."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return TrialState()
    with checkpoint.as_directory() as d:
        return restore(method, TrialState.load(Path(d) / STATE_FILE))


def _common(record: SubnetRecord, unpruned: int, spec: TrialSpec) -> dict[str, Any]:
    return {
        METRIC: float(record.metrics.get(METRIC, float("nan"))),
        "macs": record.macs,
        "params": record.params,
        "flops_fraction": record.macs / unpruned,
        "unpruned_macs": unpruned,
        "cell": spec.cell_index,
        "flops_target": spec.flops_target,
        "kd_weight": spec.kd_weight,
        "best": json.dumps(record.to_dict()),
        "node_id": ray.get_runtime_context().get_node_id(),
    }  # which node ran the step (multi-node checks)


def _report_step(
    method: Method, result: StepResult, steps: int, unpruned: int, spec: TrialSpec, checkpoint_dir: Path
) -> None:
    metrics = {
        **_common(method.best(), unpruned, spec),
        "step": result.step,
        "steps_done": steps,
        FINAL_KEY: False,
        "method_metrics": {k: float(v) for k, v in result.metrics.items()},
        "subnets": json.dumps([s.to_dict() for s in result.subnets]),
    }
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))


def _report_final(
    method: Method,
    record: SubnetRecord,
    state_dict: dict[str, torch.Tensor],
    state: TrialState,
    unpruned: int,
    spec: TrialSpec,
) -> None:
    """The final report, with a checkpoint holding the trial state and the final subnet under ``final/``."""
    scalars = {k: float(v) for k, v in record.metrics.items() if k != METRIC}
    metrics = {
        **_common(record, unpruned, spec),
        **scalars,
        "step": record.step,
        "steps_done": state.steps,
        FINAL_KEY: True,
        "final_record": json.dumps(record.to_dict()),
        "subnets": "[]",
    }
    with tempfile.TemporaryDirectory() as d:
        state.save(Path(d) / STATE_FILE)
        save_subnet(Path(d) / FINAL_DIR, record.spec, state_dict, record.to_dict(), input_size=method.ctx.input_size)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
