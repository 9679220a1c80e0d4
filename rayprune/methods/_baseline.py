"""Shared pieces of the classic baselines (uniform, l1, fpgm, random).

* Search data: every baseline scores subnets on a per-class search-val split of the training set
  (:meth:`RunContext.search_split`); the test set is never used for selection.
* Width fitting: :func:`fit_multiplier` bisects a width multiplier so a subnet meets the FLOPs
  target (uniform scaling; random's fallback shrink).
* Global ranking: :func:`filter_importance` scores every channel of every group from the trained
  full net's weights, :func:`removal_order` ranks them globally under the per-stage minimum
  widths, and :func:`fit_removals` bisects how many to drop to meet the target (l1, fpgm).
* :class:`RankedPruning`: the l1/fpgm method itself; a subclass only supplies the filter score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from .. import models
from ..engine.data import Dataset
from ..engine.train import TrainConfig, evaluate, fit, recalibrate_bn, recalibration_batches
from ..engine.utils import derive_seed
from ..errors import InputError
from ..models.base import ChannelGroup, Spec, round_to
from ..models.transfer import extract_subnet
from .base import Method, MethodHparams, RunContext, StepResult, SubnetRecord

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


def removal_order(importance: Mapping[str, torch.Tensor], mins: Widths) -> list[tuple[str, int]]:
    """All removable channels ``(group, index)``, least important first (ties: group order,
    then index), skipping those that would take a group below its minimum width."""
    ranked = sorted(
        ((float(v), gi, g, i) for gi, (g, imp) in enumerate(importance.items()) for i, v in enumerate(imp.tolist()))
    )
    left = {g: imp.numel() for g, imp in importance.items()}
    order = []
    for _, _, g, i in ranked:
        if left[g] > mins[g]:
            left[g] -= 1
            order.append((g, i))
    return order


def keep_after(full_spec: Spec, order: list[tuple[str, int]], k: int) -> dict[str, torch.Tensor]:
    """Kept channel indices per group after removing the first ``k`` channels of ``order``."""
    dropped: dict[str, set[int]] = {}
    for g, i in order[:k]:
        dropped.setdefault(g, set()).add(i)
    return {
        g.name: torch.tensor([i for i in range(g.width) if i not in dropped.get(g.name, ())], dtype=torch.long)
        for g in models.channel_groups(full_spec)
    }


def fit_removals(
    full_spec: Spec, order: list[tuple[str, int]], target_macs: int, input_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Keep-indices after removing the *fewest* leading channels of ``order`` that meet the target.

    MACs only fall as more channels go, so the count is found by bisection.
    """

    def macs_after(k: int) -> int:
        widths = {g: int(idx.numel()) for g, idx in keep_after(full_spec, order, k).items()}
        return models.macs(models.with_widths(full_spec, widths), input_size)

    lo, hi = 0, len(order)  # invariant: hi meets the target (all removable gone = the floor)
    if macs_after(hi) > target_macs:
        raise InputError(
            "the FLOPs target is below the smallest subnet allowed by the per-stage limits; "
            "raise flops_target or max_stage_prune"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if macs_after(mid) <= target_macs else (mid + 1, hi)
    return keep_after(full_spec, order, lo)


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
    resumes), score its filters, drop the globally least important channels until the FLOPs
    target is met, slice the weights (:func:`extract_subnet`) and report the subnet's search-val
    top-1 after BN recalibration. ``finalize`` fine-tunes from the sliced weights.

    One step rather than two because orchestrators report ``best()`` after every step."""

    Hparams: ClassVar[type[MethodHparams]] = RankedHparams
    inherits_weights: ClassVar[bool] = True
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
            model = models.build(self.ctx.spec, seed=seed).to(self.ctx.device)
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
        order = removal_order(importance, ctx.budget.min_widths(ctx.spec))
        self.keep = fit_removals(ctx.spec, order, ctx.budget.target_macs(ctx.spec, ctx.input_size), ctx.input_size)
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
        self.records.append(SubnetRecord.of(spec, metrics, self.name, 0, ctx.input_size, selection="global_rank"))
        return {**metrics, "macs_fraction": self.records[-1].macs / models.macs(ctx.spec, ctx.input_size)}

    def initial_weights(self, record: SubnetRecord) -> dict[str, torch.Tensor] | None:
        """The full net's weights sliced to the kept channels (before any search-time tuning)."""
        assert self.full_state is not None and self.keep is not None  # set by the one step
        return extract_subnet(self.ctx.spec, self.full_state, self.keep)[1]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "full_state": self.full_state, "keep": self.keep}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.full_state, self.keep = state["full_state"], state["keep"]
