"""Uniform width scaling: the simplest baseline.

Every channel group gets the same width multiplier ``t`` (rounded to the group's divisor,
clamped to the budget's per-stage minimum widths); ``t`` is the largest value whose subnet meets
the FLOPs target, found by bisection. On narrow nets the rounded widths move in coarse steps, so
when the result is below the target window (:class:`~rayprune.grid.TargetWindow`) the cheapest single-group
steps top it up (:func:`fill_to_window`): every method reports a subnet in ``[0.9, 1] x target``.
Nothing is learned about *which* channels matter, so the subnet is trained from scratch
(``initial_weights`` is None) by the shared fine-tune.

**The budget** is the FLOPs target alone: the per-stage maximum rates only clamp the widths as
hard floors, and an ``allocation`` is not used (a uniform cut has one share for every group). So
a sweep's Optuna study has nothing to choose for it and runs one trial per grid cell
(``budget_use = "target"``), with the loosest maximum rates.

One step: fit the multiplier, train the subnet ``eval_epochs`` from a seeded init on
search-train and report its search-val top-1 (a cheap proxy; the comparable number is the final
test accuracy after ``finalize``).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from .. import models
from ..engine.utils import derive_seed
from ..grid import TargetWindow
from ._baseline import RecordsMixin, fill_to_window, fit_multiplier, train_and_score
from .base import BudgetUse, MethodHparams, StepResult, SubnetRecord


class UniformHparams(MethodHparams):
    eval_epochs: int = Field(1, ge=1, description="search-train epochs before the search-val score")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="per-class search-val share of the training set")


class Uniform(RecordsMixin):
    """One multiplier for all channel groups, bisected to the FLOPs target."""

    name = "uniform"
    Hparams: ClassVar[type[MethodHparams]] = UniformHparams
    budget_use: ClassVar[BudgetUse] = "target"
    smoke: ClassVar[dict] = {"eval_epochs": 1}
    hp: UniformHparams

    planned_steps = 1

    @property
    def done(self) -> bool:
        return self.steps_done >= 1

    def step(self) -> StepResult:
        ctx = self.ctx
        full = {g.name: g.width for g in models.channel_groups(ctx.spec)}
        target = ctx.budget.target_macs(ctx.spec, ctx.input_size)
        t, _, widths = fit_multiplier(ctx.spec, full, ctx.budget.min_widths(ctx.spec), target, ctx.input_size)
        widths = fill_to_window(ctx.spec, widths, full, target, TargetWindow(target).low_macs, ctx.input_size)
        spec = models.with_widths(ctx.spec, widths)
        split = ctx.search_split(self.hp.val_fraction)
        score = train_and_score(spec, ctx, split, self.hp.eval_epochs, derive_seed(ctx.seed, "uniform"))
        record = SubnetRecord.of(spec, {"val_top1": score}, self.name, 0, ctx.input_size, multiplier=t)
        self.records.append(record)
        self.steps_done += 1
        return StepResult(step=0, metrics={"val_top1": score, "multiplier": t}, subnets=[record], done=True)
