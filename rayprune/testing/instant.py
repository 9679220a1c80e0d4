"""``instant``: a near-instant pruning method for tests and benchmarks of the sweep machinery.

It learns nothing and trains nothing. Each step reports ``subnets`` records (default 10): the
uniform-multiplier fit of the FLOPs target (the per-stage minimum widths rarely bind it, so
every trial of a grid cell finds the same subnet) and variants with one channel group narrowed, with made-up search-val
scores in which the fit always ranks first. So ``best()`` is one subnet per cell, and every
trial of a cell after the first reuses the cell's final-phase training from the sweep's cache:
a sweep of hundreds of trials spends its time in Ray Tune, the driver and the tracking store,
which is what ``bench/sweep_overhead.py`` and the cluster tests measure.

It is registered only when this module is imported, never by ``rayprune.methods``. A sweep
with trials on Ray workers registers it there too, through Ray's worker set-up hook::

    ray.init(..., runtime_env={"worker_process_setup_hook": "rayprune.testing.instant.register"})

Pure torch, like the rest of ``rayprune.testing``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from .. import models
from ..methods import METHODS, MethodHparams, StepResult, SubnetRecord
from ..methods import register as _register_method
from ..methods._baseline import RecordsMixin, fit_multiplier

NAME = "instant"
#: What a sweep passes to ``ray.init(runtime_env=...)`` so that every Ray worker knows the method.
RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.register"}


class InstantHparams(MethodHparams):
    subnets: int = Field(10, ge=1, description="subnet records reported per step")
    steps: int = Field(1, ge=1, description="steps before the search is done")
    busy_s: float = Field(0.0, ge=0.0, description="seconds each step sleeps, standing in for work")
    meet: int = Field(0, ge=0, description="trials whose first step must have begun before any goes on (0: none)")
    meet_dir: str | None = Field(None, description="a folder the trials of one sweep share, where they meet")
    meet_timeout_s: float = Field(600.0, gt=0.0, description="the longest a first step waits for the others")


class Instant(RecordsMixin):
    """Reports ``subnets`` made-up records per step; see the module docstring."""

    Hparams: ClassVar[type[MethodHparams]] = InstantHparams
    smoke: ClassVar[dict] = {}
    hp: InstantHparams

    @property
    def done(self) -> bool:
        return self.steps_done >= self.hp.steps

    def step(self) -> StepResult:
        ctx, step = self.ctx, self.steps_done
        if step == 0 and self.hp.meet:
            self._meet()
        if self.hp.busy_s:
            time.sleep(self.hp.busy_s)
        groups = models.channel_groups(ctx.spec)
        full = {g.name: g.width for g in groups}
        target = ctx.budget.target_macs(ctx.spec, ctx.input_size)
        mins = ctx.budget.min_widths(ctx.spec)
        _, _, fit = fit_multiplier(ctx.spec, full, mins, target, ctx.input_size)
        records: list[SubnetRecord] = []
        seen: set[str] = set()
        for k in range(self.hp.subnets * 4):  # narrowed variants; a clamped one may repeat a spec
            if len(records) == self.hp.subnets:
                break
            widths = dict(fit)
            if k:
                group = groups[(k - 1 + step) % len(groups)]
                widths[group.name] = max(mins[group.name], widths[group.name] - ((k - 1) // len(groups) + 1))
            spec = models.with_widths(ctx.spec, widths)
            key = models.spec_hash(spec)
            if key in seen:
                continue
            seen.add(key)
            score = 0.5 - 0.001 * len(records)  # the fit ranks first, always
            records.append(SubnetRecord.of(spec, {"val_top1": score}, self.name, step, ctx.input_size, variant=k))
        self.records.extend(records)
        self.steps_done += 1
        return StepResult(
            step=step,
            metrics={"val_top1": records[0].metrics["val_top1"], "subnets": float(len(records))},
            subnets=records,
            done=self.done,
        )

    def _meet(self) -> None:
        """Waits (at most ``meet_timeout_s``) until ``meet`` trials have begun their first step, so
        that a test sees that many run at once however loaded the machine is; a sleep would only
        make it likely."""
        if self.hp.meet_dir is None:
            raise ValueError("instant: meet needs meet_dir, a folder the sweep's trials share")
        folder = Path(self.hp.meet_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / uuid.uuid4().hex).touch()
        deadline = time.monotonic() + self.hp.meet_timeout_s
        while len(list(folder.iterdir())) < self.hp.meet and time.monotonic() < deadline:
            time.sleep(0.1)


def register() -> None:
    """Register ``instant`` in this process (idempotent): the Ray worker set-up hook."""
    if NAME not in METHODS:
        _register_method(NAME)(Instant)


register()

__all__ = ["NAME", "RUNTIME_ENV", "Instant", "InstantHparams", "register"]
