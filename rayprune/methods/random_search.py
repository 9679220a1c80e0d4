"""Random search over widths: the "is the search doing anything?" baseline.

Without an ``allocation`` in the budget, each step draws one width per channel group uniformly
between the group's minimum width (from the budget's per-stage limits) and its full width,
rounded to the group's divisor. Draws outside the target window
(:class:`~rayprune.grid.TargetWindow`) are rejected, so every sample is comparable with the
other methods' subnets at that target; after ``max_tries`` rejections the last draw over the
target (else the full widths) is shrunk by the largest common multiplier that fits
(:func:`fit_multiplier`), which lands just under the target. On most targets the per-stage
maximum rates do not bind these draws, so the budget hardly changes what is sampled.

With an allocation, a sample instead draws one weight ``w`` per channel group, uniform in
[0, 1], and prunes the group at the rate ``k * S * share * w / mean(w of its stage)`` (``S``
stages; capped by the stage's maximum rate), with one scalar ``k`` fitted on the exact MACs into
the window (:func:`~rayprune.methods._baseline.fit_into_window`): the allocation fixes how much
each stage is pruned, the draw how the stage's pruning spreads over its groups, and every sample
lands in the window. The per-stage maximum rates stay hard floors either way; widths move in
single channels (a group's divisor is not kept, except a grouped conv's: one channel per block),
and the record's ``alloc_scale`` is ``k``.

Each sample is trained from a seeded init for ``eval_epochs`` on search-train and scored on
search-val (architecture-only, like uniform: no inherited weights, so no teacher is needed and
the score is honest). ``best()`` is the highest search-val top-1; ``finalize`` trains it from
scratch with the shared fine-tune. All randomness comes from generators seeded by
(ctx.seed, step), so resuming at any step reproduces the same draws.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from .. import models
from ..engine.utils import derive_seed
from ..grid import WINDOW_LOW, TargetWindow
from ..models.base import ChannelGroup, Spec, round_to
from ..models.tiles import interleaved_from_last
from ._baseline import (
    RecordsMixin,
    RemovalQueue,
    Widths,
    fit_into_window,
    fit_multiplier,
    merge_queues,
    rounded_scale,
    train_and_score,
    widths_of,
)
from .base import BudgetUse, MethodHparams, StepResult, SubnetRecord


def draw_widths(groups: list[ChannelGroup], mins: Widths, gen: torch.Generator) -> Widths:
    """One width per group, uniform in [min, full], rounded to the divisor and clamped."""
    out = {}
    for g in groups:
        w = int(torch.randint(mins[g.name], g.width + 1, (1,), generator=gen))
        out[g.name] = min(g.width, max(mins[g.name], round_to(w, g.divisor)))
    return out


def group_queues(
    groups: list[ChannelGroup], mins: Widths, shares: list[float], gen: torch.Generator
) -> list[RemovalQueue]:
    """One queue per channel group at a random pace around its stage's share (see the module
    docstring); a group gives up its highest channel indices first, of each block in turn for a
    grouped conv's group (no weights are inherited, so only its width matters)."""
    weights = torch.rand(len(groups), generator=gen, dtype=torch.float64).tolist()
    queues = []
    for g, w in zip(groups, weights, strict=True):
        stage = [wi for gi, wi in zip(groups, weights, strict=True) if gi.stage == g.stage]
        mean = sum(stage) / len(stage)
        pace = len(shares) * shares[g.stage] * (w / mean if mean > 0 else 1.0)
        channels = [(g.name, i) for i in interleaved_from_last(g.width, g.tiles, mins[g.name])]
        queues.append(RemovalQueue(channels, g.width, pace))
    return queues


def sample_allocated(
    full_spec: Spec,
    mins: Widths,
    shares: list[float],
    target_macs: int,
    gen: torch.Generator,
    input_size: int | None = None,
    window_low: float = WINDOW_LOW,
) -> tuple[Widths, float]:
    """Random widths whose stages follow ``shares``, fitted into the target window: ``(widths, k)``."""
    queues = group_queues(models.channel_groups(full_spec), mins, shares, gen)
    low = TargetWindow(target_macs, window_low).low_macs
    keep, scale = fit_into_window(full_spec, merge_queues(queues), target_macs, low, input_size)
    return widths_of(keep), scale


def sample_feasible(
    full_spec: Spec,
    mins: Widths,
    target_macs: int,
    gen: torch.Generator,
    max_tries: int,
    input_size: int | None = None,
    window_low: float = WINDOW_LOW,
) -> tuple[Widths, int, bool]:
    """A random width assignment with MACs in ``[window_low * target_macs, target_macs]``:
    ``(widths, tries, shrunk)``."""
    groups = models.channel_groups(full_spec)
    window = TargetWindow(target_macs, window_low)
    over = None
    for tries in range(1, max_tries + 1):
        widths = draw_widths(groups, mins, gen)
        macs = models.macs(models.with_widths(full_spec, widths), input_size)
        if window.contains(macs):
            return widths, tries, False
        if macs > target_macs:
            over = widths
    ceiling = over if over is not None else {g.name: g.width for g in groups}
    _, _, widths = fit_multiplier(full_spec, ceiling, mins, target_macs, input_size)
    return widths, max_tries, True


class RandomHparams(MethodHparams):
    samples: int = Field(10, ge=1, description="random subnets to draw and score (one per step)")
    eval_epochs: int = Field(1, ge=1, description="search-train epochs per sample before the search-val score")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="per-class search-val share of the training set")
    max_tries: int = Field(50, ge=1, description="rejection-sampling draws before shrinking the last one")


class RandomSearch(RecordsMixin):
    """Seeded random feasible widths; one sample per step; best by search-val top-1."""

    name = "random"
    Hparams: ClassVar[type[MethodHparams]] = RandomHparams
    budget_use: ClassVar[BudgetUse] = "allocation"
    smoke: ClassVar[dict] = {"samples": 2, "eval_epochs": 1}
    hp: RandomHparams

    @property
    def planned_steps(self) -> int:
        return self.hp.samples

    @property
    def done(self) -> bool:
        return self.steps_done >= self.hp.samples

    def step(self) -> StepResult:
        ctx, k = self.ctx, self.steps_done
        widths, source = self._draw(k)
        spec = models.with_widths(ctx.spec, widths)
        split = ctx.search_split(self.hp.val_fraction)
        score = train_and_score(spec, ctx, split, self.hp.eval_epochs, derive_seed(ctx.seed, "random-train", k))
        record = SubnetRecord.of(spec, {"val_top1": score}, self.name, k, ctx.input_size, sample=k, **source)
        tries = source["tries"]
        self.records.append(record)
        self.steps_done += 1
        metrics = {"val_top1": score, "best_val_top1": self.best().metrics["val_top1"], "tries": float(tries)}
        return StepResult(step=k, metrics=metrics, subnets=[record], done=self.done)

    def _draw(self, k: int) -> tuple[Widths, dict[str, Any]]:
        """Sample ``k``'s widths (seeded by (ctx.seed, k)) and what its record says about the draw."""
        ctx = self.ctx
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "random", k))
        mins, target = ctx.budget.min_widths(ctx.spec), ctx.budget.target_macs(ctx.spec, ctx.input_size)
        shares = ctx.budget.stage_shares(ctx.spec)
        if shares is None:
            widths, tries, shrunk = sample_feasible(ctx.spec, mins, target, gen, self.hp.max_tries, ctx.input_size)
            return widths, {"tries": tries, "shrunk": shrunk}
        widths, scale = sample_allocated(ctx.spec, mins, shares, target, gen, ctx.input_size)
        return widths, {"tries": 1, "shrunk": False, "alloc_scale": rounded_scale(scale)}
