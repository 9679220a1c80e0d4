"""Shared pieces of the classic baselines (uniform, l1, fpgm, random).

* Search data: every baseline scores subnets on a per-class search-val split of the training set
  (:meth:`RunContext.search_split`); the test set is never used for selection.
* Width fitting: :func:`fit_multiplier` bisects a width multiplier so a subnet meets the FLOPs
  target (uniform scaling; random's fallback shrink).
* Global ranking: :func:`filter_importance` scores every channel of every group from the trained
  full net's weights, :func:`removal_order` ranks them globally under the per-stage minimum
  widths, and :func:`fit_removals` bisects how many to drop to meet the target (l1, fpgm).
* Allocated removal (a budget with an ``allocation``): each stage (l1, fpgm) or group (random)
  gives up its channels in its own order at its own pace (:class:`RemovalQueue`);
  :func:`merge_queues` interleaves them as one scalar ``k`` grows, and :func:`fit_into_window`
  finds ``k`` by bisection on the exact MACs so the subnet lands in the target window.
* :class:`RankedPruning`: the l1/fpgm method itself; a subclass only supplies the filter score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from .. import models
from ..engine.data import Dataset
from ..engine.train import TrainConfig, evaluate, fit, recalibrate_bn, recalibration_batches
from ..engine.utils import derive_seed
from ..errors import InputError
from ..grid import TargetWindow
from ..models.base import ChannelGroup, Spec, round_to
from ..models.tiles import completed_removals
from ..models.transfer import extract_subnet
from .base import BudgetUse, Method, MethodHparams, RunContext, StepResult, SubnetRecord

Widths = dict[str, int]
FilterScore = Callable[[torch.Tensor], torch.Tensor]  # [C_out, ...] weight -> [C_out] scores


# --------------------------------------------------------------------------------------------
# Seeds, data, scoring
# --------------------------------------------------------------------------------------------


def search_config(ctx: RunContext, epochs: int) -> TrainConfig:
    """The fine-tune recipe shortened to ``epochs`` plain-CE epochs (search-time training)."""
    base = ctx.finetune or TrainConfig()
    return base.model_copy(
        update={"epochs": epochs, "warmup_epochs": 0, "schedule": "cosine", "milestones": [], "kd_weight": 0.0}
    )


def val_top1(model: nn.Module, data: Dataset, ctx: RunContext) -> float:
    return float(evaluate(model, data, device=ctx.device, batch_size=search_config(ctx, 1).eval_batch_size)["top1"])


def train_and_score(spec: Spec, ctx: RunContext, split: tuple[Dataset, Dataset], epochs: int, seed: int) -> float:
    """Train ``spec`` from a seeded init for ``epochs`` on search-train; search-val top-1."""
    model = models.build(spec, seed=seed).to(ctx.device)
    fit(model, split[0], search_config(ctx, epochs), device=ctx.device, seed=seed, progress=ctx.progress)
    return val_top1(model, split[1], ctx)


# --------------------------------------------------------------------------------------------
# Width multipliers
# --------------------------------------------------------------------------------------------


def scaled_widths(groups: list[ChannelGroup], ceiling: Widths, mins: Widths, t: float) -> Widths:
    """Each group's ``ceiling`` width times ``t``, rounded to the group's divisor and clamped
    to [min width, ceiling]."""
    return {g.name: min(ceiling[g.name], max(mins[g.name], round_to(ceiling[g.name] * t, g.divisor))) for g in groups}


def fit_multiplier(
    full_spec: Spec, ceiling: Widths, mins: Widths, target_macs: int, input_size: int | None = None, iters: int = 40
) -> tuple[float, float, Widths]:
    """Largest multiplier ``t`` in [0, 1] whose :func:`scaled_widths` meet ``target_macs``.

    Returns ``(t, t_over, widths)``: ``widths`` at ``t`` are within the target; ``t_over`` is
    the smallest multiplier tried above it that exceeds the target (``t_over - t < 2**-iters``;
    1.0 when the ceiling itself fits). Needs the all-minimum widths to fit
    (:meth:`Budget.check_reachable` guarantees it).
    """
    groups = models.channel_groups(full_spec)

    def fits(t: float) -> bool:
        return (
            models.macs(models.with_widths(full_spec, scaled_widths(groups, ceiling, mins, t)), input_size)
            <= target_macs
        )

    if fits(1.0):
        return 1.0, 1.0, scaled_widths(groups, ceiling, mins, 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi, scaled_widths(groups, ceiling, mins, lo)


def fill_to_window(
    full_spec: Spec, widths: Widths, ceiling: Widths, target_macs: int, low: float, input_size: int | None = None
) -> Widths:
    """Top ``widths`` up into the target window: while their MACs are below ``low``, widen by
    one divisor step the group whose step adds the fewest MACs and keeps the subnet within
    ``target_macs`` (never above its ``ceiling``). A multiplier shared by all groups moves in
    coarse steps on narrow nets (several groups round together) and can stop well short of the
    target; this closes that gap. Returns the widths unchanged when no step fits."""
    groups = models.channel_groups(full_spec)
    widths = dict(widths)
    macs = models.macs(models.with_widths(full_spec, widths), input_size)
    while macs < low:
        best: tuple[int, str, int] | None = None
        for g in groups:
            wider = min(ceiling[g.name], widths[g.name] + g.divisor)
            if wider == widths[g.name]:
                continue
            m = models.macs(models.with_widths(full_spec, {**widths, g.name: wider}), input_size)
            if m <= target_macs and (best is None or m < best[0]):
                best = (m, g.name, wider)
        if best is None:
            break
        macs, name, wider = best
        widths[name] = wider
    return widths


# --------------------------------------------------------------------------------------------
# Filter importance and global ranking
# --------------------------------------------------------------------------------------------


def l1_scores(weight: torch.Tensor) -> torch.Tensor:
    """Li et al. 2017: a filter's importance is the L1 norm of its weights."""
    return weight.flatten(1).abs().sum(1)


def fpgm_scores(weight: torch.Tensor) -> torch.Tensor:
    """He et al. 2019 (FPGM): a filter's importance is the sum of its Euclidean distances to the
    layer's other filters; filters near the geometric median are the most replaceable."""
    flat = weight.flatten(1).double()
    return torch.cdist(flat, flat).sum(1)


def filter_importance(
    state: Mapping[str, torch.Tensor], axes: Mapping[str, tuple], score: FilterScore
) -> dict[str, torch.Tensor]:
    """Per channel group, the importance of each of its channels.

    The producers of group ``g`` are the conv/linear weights (ndim >= 2) whose output axis is
    ``g``. Each producer's filter scores are divided by their layer mean so layers of different
    size and scale are comparable, then averaged over the group's producers. (Averaging rather
    than summing keeps a residual group, which has one producer per block, on the same scale as
    a block's inner group; a sum would shield residual channels from pruning just for being
    tied.)
    """
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for key, dims in axes.items():
        weight = state[key]
        if weight.ndim < 2 or not dims or dims[0] is None:
            continue
        s = score(weight.detach().float().cpu()).double()
        s = s / s.mean().clamp_min(1e-12)
        group = dims[0]
        totals[group] = totals.get(group, 0) + s
        counts[group] = counts.get(group, 0) + 1
    return {g: totals[g] / counts[g] for g in totals}


def removal_order(
    importance: Mapping[str, torch.Tensor], mins: Widths, tiles: Mapping[str, int] | None = None
) -> list[tuple[str, int]]:
    """All removable channels ``(group, index)``, least important first (ties: group order,
    then index), skipping those that would take a group below its minimum width (each block of
    a tiled group, ``tiles[g]`` > 1, below its share of it: :mod:`~rayprune.models.tiles`)."""
    tiles = tiles or {}
    ranked = sorted(
        ((float(v), gi, g, i) for gi, (g, imp) in enumerate(importance.items()) for i, v in enumerate(imp.tolist()))
    )
    block = {g: imp.numel() // tiles.get(g, 1) for g, imp in importance.items()}
    left = {(g, b): block[g] for g in importance for b in range(tiles.get(g, 1))}
    order = []
    for _, _, g, i in ranked:
        if left[g, i // block[g]] > mins[g] // tiles.get(g, 1):
            left[g, i // block[g]] -= 1
            order.append((g, i))
    return order


Channel = tuple[str, int]  # (channel group, channel index)
Keep = dict[str, torch.Tensor]  # channel group -> the indices of its kept channels


def keep_without(full_spec: Spec, removed: Sequence[Channel]) -> Keep:
    """Kept channel indices per group after removing the channels ``removed`` (in removal order;
    a tiled group gives up only whole rounds of one channel per block,
    :func:`~rayprune.models.tiles.completed_removals`)."""
    by_group: dict[str, list[int]] = {}
    for name, i in removed:
        by_group.setdefault(name, []).append(i)
    keep = {}
    for g in models.channel_groups(full_spec):
        dropped = set(completed_removals(by_group.get(g.name, ()), g.width, g.tiles))
        keep[g.name] = torch.tensor([i for i in range(g.width) if i not in dropped], dtype=torch.long)
    return keep


def keep_after(full_spec: Spec, order: list[Channel], k: int) -> dict[str, torch.Tensor]:
    """Kept channel indices per group after removing the first ``k`` channels of ``order``."""
    return keep_without(full_spec, order[:k])


def widths_of(keep: Mapping[str, torch.Tensor]) -> Widths:
    """Each group's width from its kept channel indices."""
    return {g: int(idx.numel()) for g, idx in keep.items()}


def macs_without(full_spec: Spec, removed: Sequence[Channel], input_size: int | None = None) -> int:
    """The exact MACs of ``full_spec`` with the channels ``removed`` gone."""
    widths = widths_of(keep_without(full_spec, removed))
    return models.macs(models.with_widths(full_spec, widths), input_size)


def fewest_removals(full_spec: Spec, order: list[Channel], target_macs: int, input_size: int | None = None) -> int:
    """The fewest leading channels of ``order`` whose removal meets ``target_macs``.

    MACs only fall as more channels go, so the count is found by bisection.
    """
    lo, hi = 0, len(order)  # invariant: hi meets the target (all removable gone = the floor)
    if macs_without(full_spec, order, input_size) > target_macs:
        raise InputError(
            "the FLOPs target is below the smallest subnet allowed by the per-stage limits; "
            "raise flops_target or max_stage_prune"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if macs_without(full_spec, order[:mid], input_size) <= target_macs else (mid + 1, hi)
    return lo


def fit_removals(
    full_spec: Spec, order: list[Channel], target_macs: int, input_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Keep-indices after removing the *fewest* leading channels of ``order`` that meet the target."""
    return keep_after(full_spec, order, fewest_removals(full_spec, order, target_macs, input_size))


# --------------------------------------------------------------------------------------------
# Allocated removal: per-stage (or per-group) rates scaled by one scalar
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemovalQueue:
    """Channels one part of the net (a stage, or a channel group) gives up, first removed first,
    at its own pace: its ``j``-th channel goes once the scale ``k`` reaches
    ``j / (total * speed)``, i.e. when the part's rate ``j / total`` reaches ``k * speed``."""

    channels: list[Channel]
    total: int  # the part's full channel count: the denominator of its rate
    speed: float  # its rate per unit of scale; 0: only once every part with a speed is done


def merge_queues(queues: Sequence[RemovalQueue]) -> list[tuple[Channel, float]]:
    """Every channel of ``queues`` in the order a growing scale ``k`` removes them, each with the
    ``k`` at which it goes (inf for a queue without speed: those follow, by rate). Ties go to the
    earlier queue, so the order is deterministic."""
    keyed = []
    for q_index, queue in enumerate(queues):
        for j, channel in enumerate(queue.channels, start=1):
            rate = j / queue.total
            key = (0, rate / queue.speed) if queue.speed > 0 else (1, rate)
            keyed.append((key, q_index, j, channel))
    keyed.sort()
    return [(channel, key[1] if key[0] == 0 else math.inf) for key, _, _, channel in keyed]


def fit_into_window(
    full_spec: Spec,
    merged: list[tuple[Channel, float]],
    target_macs: int,
    low_macs: float,
    input_size: int | None = None,
) -> tuple[Keep, float]:
    """Keep-indices and scale ``k`` of the subnet that removes ``merged``'s channels in order
    until it meets ``target_macs``: the smallest ``k`` (the fewest leading channels, by
    bisection on the exact MACs). One channel can weigh more than the window on a narrow net;
    when the last one lands the subnet below ``low_macs`` it is kept, and the next channels in
    order are removed instead, skipping any that would land below the window. When no such walk
    reaches the window, the fewest leading channels stand (the record says where they landed)."""
    order = [channel for channel, _ in merged]
    n = fewest_removals(full_spec, order, target_macs, input_size)
    if n == 0 or macs_without(full_spec, order[:n], input_size) >= low_macs:
        return keep_after(full_spec, order, n), (merged[n - 1][1] if n else 0.0)
    removed, scale = order[: n - 1], merged[n - 2][1] if n > 1 else 0.0
    for channel, k in merged[n - 1 :]:
        macs = macs_without(full_spec, [*removed, channel], input_size)
        if macs < low_macs:
            continue
        removed.append(channel)
        scale = k
        if macs <= target_macs:
            return keep_without(full_spec, removed), scale
    return keep_after(full_spec, order, n), merged[n - 1][1]


def stage_queues(
    importance: Mapping[str, torch.Tensor], groups: list[ChannelGroup], mins: Widths, shares: list[float]
) -> list[RemovalQueue]:
    """One queue per stage: its channels in the method's own ranking (:func:`removal_order`
    within the stage), at the pace ``S * share`` (``S`` stages)."""
    queues = []
    for stage, share in enumerate(shares):
        members = [g for g in groups if g.stage == stage and g.name in importance]
        order = removal_order({g.name: importance[g.name] for g in members}, mins, {g.name: g.tiles for g in members})
        queues.append(RemovalQueue(order, sum(g.width for g in members) or 1, len(shares) * share))
    return queues


def rounded_scale(scale: float) -> float | None:
    """The fitted scale as a record stores it (None for inf: only zero-share stages were cut)."""
    return None if math.isinf(scale) else round(scale, 6)


# --------------------------------------------------------------------------------------------
# Record bookkeeping shared by every baseline
# --------------------------------------------------------------------------------------------


class RecordsMixin(Method):
    """Keeps the evaluated :class:`SubnetRecord` s; best = highest search-val top-1; the
    resumable state is the step counter plus the records (subclasses add their own)."""

    def __init__(self, ctx: RunContext, hparams: MethodHparams | dict[str, Any] | None = None) -> None:
        super().__init__(ctx, hparams)
        self.records: list[SubnetRecord] = []

    def best(self) -> SubnetRecord:
        if not self.records:
            raise RuntimeError(f"{self.name}: no subnet evaluated yet; call step() first")
        return max(self.records, key=lambda r: r.metrics["val_top1"])  # max keeps the first of ties

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "records": [r.to_dict() for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.records = [SubnetRecord.from_dict(d) for d in state["records"]]


# --------------------------------------------------------------------------------------------
# l1 / fpgm: prune a trained net by a global filter ranking, inherit its weights
# --------------------------------------------------------------------------------------------


class RankedHparams(MethodHparams):
    pretrain_epochs: int = Field(10, ge=1, description="epochs to train the full net when no teacher is given")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="per-class search-val share of the training set")
    bn_recal_batches: int = Field(20, ge=1, description="batches to re-estimate BN statistics after pruning")
    eval_epochs: int = Field(0, ge=0, description="search-train fine-tune epochs before scoring (0: BN recal only)")


class RankedPruning(RecordsMixin):
    """One step: take the trained full net (ctx.teacher's weights, else ``pretrain_epochs`` on
    search-train, checkpointed per epoch under ``workdir/pretrain`` so an interrupted step
    resumes), score its filters, drop the least important channels until the FLOPs target is
    met, slice the weights (:func:`extract_subnet`) and report the subnet's search-val top-1
    after BN recalibration. ``finalize`` fine-tunes from the sliced weights.

    The budget: the per-stage maximum rates are hard floors. Without an ``allocation`` the
    channels are ranked globally, and on most targets the floors never bind, so the budget does
    not change the subnet. With one, the allocation decides how much each stage is pruned (its
    rate ``k * S * share``, one scalar ``k`` fitted on the exact MACs into the target window,
    :func:`fit_into_window`) and the score decides which channels of the stage go. The record's
    ``alloc_scale`` is that ``k``.

    One step rather than two because orchestrators report ``best()`` after every step."""

    Hparams: ClassVar[type[MethodHparams]] = RankedHparams
    inherits_weights: ClassVar[bool] = True
    budget_use: ClassVar[BudgetUse] = "allocation"
    score: ClassVar[staticmethod[[torch.Tensor], torch.Tensor]]  # a subclass sets score = staticmethod(fn)
    smoke: ClassVar[dict] = {"pretrain_epochs": 1, "bn_recal_batches": 2}
    hp: RankedHparams

    def __init__(self, ctx: RunContext, hparams: MethodHparams | dict[str, Any] | None = None) -> None:
        super().__init__(ctx, hparams)
        self.full_state: dict[str, torch.Tensor] | None = None
        self.keep: dict[str, torch.Tensor] | None = None

    planned_steps = 1

    @property
    def done(self) -> bool:
        return self.steps_done >= 1

    def step(self) -> StepResult:
        split = self.ctx.search_split(self.hp.val_fraction)
        metrics = {**self._train_full(split), **self._prune(split)}
        self.steps_done += 1
        return StepResult(step=0, metrics=metrics, subnets=self.records[-1:], done=True)

    def _train_full(self, split: tuple[Dataset, Dataset]) -> dict[str, float]:
        if self.ctx.teacher is not None:
            model = self.ctx.teacher
            expected = set(models.tensor_axes(self.ctx.spec))
            if set(model.state_dict()) != expected:
                raise InputError(
                    f"{self.name}: ctx.teacher does not match the full spec's state_dict keys; "
                    "pass the unpruned network built from ctx.spec as the teacher"
                )
        else:
            seed = derive_seed(self.ctx.seed, "pretrain")
            model = self.ctx.unpruned_net(seed).to(self.ctx.device)
            workdir = self.ctx.workdir / "pretrain" if self.ctx.workdir is not None else None
            fit(
                model,
                split[0],
                search_config(self.ctx, self.hp.pretrain_epochs),
                device=self.ctx.device,
                seed=seed,
                checkpoint_dir=workdir,
                progress=self.ctx.progress,
            )
        self.full_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return {"pretrain_val_top1": val_top1(model, split[1], self.ctx)}

    def _prune(self, split: tuple[Dataset, Dataset]) -> dict[str, float]:
        ctx = self.ctx
        assert self.full_state is not None  # step() trains the full net first
        importance = filter_importance(self.full_state, models.tensor_axes(ctx.spec), type(self).score)
        self.keep, source = self._choose_channels(importance)
        spec, state = extract_subnet(ctx.spec, self.full_state, self.keep)
        model = models.build(spec, seed=0).to(ctx.device)  # seeded: the init is overwritten anyway
        model.load_state_dict(state)
        batch = search_config(ctx, 1).batch_size
        recalibrate_bn(
            model,
            recalibration_batches(
                split[0],
                self.hp.bn_recal_batches * batch,
                batch,
                device=ctx.device,
                seed=derive_seed(ctx.seed, "recalib"),
            ),
        )
        if self.hp.eval_epochs:
            fit(
                model,
                split[0],
                search_config(ctx, self.hp.eval_epochs),
                device=ctx.device,
                seed=derive_seed(ctx.seed, "eval"),
                progress=ctx.progress,
            )
        metrics = {"val_top1": val_top1(model, split[1], ctx)}
        self.records.append(SubnetRecord.of(spec, metrics, self.name, 0, ctx.input_size, **source))
        return {**metrics, "macs_fraction": self.records[-1].macs / models.macs(ctx.spec, ctx.input_size)}

    def _choose_channels(self, importance: Mapping[str, torch.Tensor]) -> tuple[Keep, dict[str, Any]]:
        """Kept channels per group under the budget (see the class docstring), and what the
        record says about the choice."""
        ctx = self.ctx
        mins, target = ctx.budget.min_widths(ctx.spec), ctx.budget.target_macs(ctx.spec, ctx.input_size)
        shares = ctx.budget.stage_shares(ctx.spec)
        if shares is None:
            order = removal_order(importance, mins, {g.name: g.tiles for g in models.channel_groups(ctx.spec)})
            return fit_removals(ctx.spec, order, target, ctx.input_size), {"selection": "global_rank"}
        queues = stage_queues(importance, models.channel_groups(ctx.spec), mins, shares)
        low = TargetWindow(target).low_macs
        keep, scale = fit_into_window(ctx.spec, merge_queues(queues), target, low, ctx.input_size)
        return keep, {"selection": "stage_rank", "alloc_scale": rounded_scale(scale)}

    def initial_weights(self, record: SubnetRecord) -> dict[str, torch.Tensor] | None:
        """The full net's weights sliced to the kept channels (before any search-time tuning)."""
        assert self.full_state is not None and self.keep is not None  # set by the one step
        return extract_subnet(self.ctx.spec, self.full_state, self.keep)[1]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "full_state": self.full_state, "keep": self.keep}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.full_state, self.keep = state["full_state"], state["keep"]
