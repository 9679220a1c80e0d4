"""The common method interface (AST, TAS, SP and the baselines all implement it).

A method is constructed from a :class:`RunContext` (full spec, data, budget, KD weight and
teacher, device, seed, workdir, fine-tune recipe) and validated :class:`MethodHparams`. An
orchestrator then calls :meth:`Method.step` until ``done``; each step returns metrics and the
:class:`SubnetRecord` s it evaluated. ``state_dict``/``load_state_dict`` resume exactly between
steps. :func:`rayprune.methods.finetune.finalize` then fine-tunes the chosen subnet with the
shared engine and returns it as spec + state_dict with test/robust accuracy and latency.

The method never sees Ray, Optuna or MLflow.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from .. import models
from ..errors import InputError
from ..models.base import Spec, SpecError, spec_hash
from ..models.tiles import round_up

# --------------------------------------------------------------------------------------------
# Hyperparameters and budget
# --------------------------------------------------------------------------------------------

BudgetUse = Literal["max_rates", "allocation", "target"]


class MethodHparams(BaseModel):
    """Base of every method's hyperparameters. Fields are exactly the keys a search space may
    set; unknown keys and invalid values are rejected (pydantic names the field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(BaseModel):
    """What a method must respect.

    * ``flops_target``: the subnet's MACs as a fraction of the unpruned MACs (0 < f <= 1).
    * ``max_stage_prune``: optional per-stage maximum pruning rate, the fraction of a stage's
      channels (per channel group) that may be removed, in [0, 1): the hard floor of every width.
    * ``allocation``: optional per-stage share of the pruning (one non-negative number per stage,
      normalised to sum 1 by :meth:`stage_shares`), for the methods whose
      :attr:`Method.budget_use` is ``"allocation"``: stage ``s`` is pruned at the rate
      ``k * S * share_s`` (``S`` stages; capped by its maximum rate), with one scalar ``k`` fitted
      on the exact MACs so the subnet lands in the target window. A zero share prunes that stage
      only once every other stage is at its floor. None: the method's own global choice.
    * ``min_keep``: whatever the stage rates allow, no channel group keeps fewer than this
      fraction of its width (nor fewer than its divisor): a net whose stem or stage is cut to one
      channel is never a useful answer, and a floor stops mass-based samplers from collapsing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    flops_target: float = Field(gt=0.0, le=1.0)
    max_stage_prune: list[float] | None = None
    allocation: list[float] | None = None
    min_keep: float = Field(0.1, ge=0.0, lt=1.0)

    @field_validator("max_stage_prune")
    @classmethod
    def _rates_in_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            for i, r in enumerate(v):
                if not (0.0 <= r < 1.0):
                    raise ValueError(f"max_stage_prune[{i}] must be in [0, 1), got {r}")
        return v

    @field_validator("allocation")
    @classmethod
    def _shares_valid(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            for i, share in enumerate(v):
                if not (math.isfinite(share) and share >= 0.0):
                    raise ValueError(f"allocation[{i}] must be a finite share >= 0, got {share}")
            if not any(share > 0 for share in v):
                raise ValueError(f"allocation needs at least one positive share, got {v}")
        return v

    def stage_shares(self, full_spec: Spec) -> list[float] | None:
        """The allocation normalised to sum 1, one share per stage of ``full_spec``; None without one."""
        if self.allocation is None:
            return None
        stages = num_stages(full_spec)
        if len(self.allocation) != stages:
            raise SpecError(
                f"allocation needs {stages} entries (one share per stage of the model), "
                f"got {len(self.allocation)}: {self.allocation}"
            )
        total = sum(self.allocation)
        return [share / total for share in self.allocation]

    def stage_rate(self, stage: int) -> float:
        if self.max_stage_prune is None:
            return 1.0 - 1e-9  # effectively unconstrained (a group keeps >= 1 channel)
        if stage >= len(self.max_stage_prune):
            raise SpecError(
                f"max_stage_prune needs an entry for every stage of the model (stage {stage} has "
                f"none), got {len(self.max_stage_prune)}: {self.max_stage_prune}"
            )
        return self.max_stage_prune[stage]

    def min_widths(self, full_spec: Spec) -> dict[str, int]:
        """Smallest width each channel group of the *full* spec may be pruned to: the stage's
        rate, but never below ``min_keep`` of the group's width, its divisor or one channel (and a
        multiple of a grouped conv's divisor, :mod:`~rayprune.models.tiles`)."""
        out = {}
        groups = models.channel_groups(full_spec)
        stages = num_stages(full_spec)
        if self.max_stage_prune is not None and len(self.max_stage_prune) != stages:
            raise SpecError(
                f"max_stage_prune needs {stages} entries (one rate per stage of the model), "
                f"got {len(self.max_stage_prune)}: {self.max_stage_prune}"
            )
        for g in groups:
            by_stage = math.ceil(g.width * (1.0 - self.stage_rate(g.stage)) - 1e-9)
            by_fraction = math.ceil(g.width * self.min_keep - 1e-9)
            out[g.name] = min(g.width, round_up(max(g.min_width, by_stage, by_fraction, g.divisor, 1), g.tiles))
        return out

    def target_macs(self, full_spec: Spec, input_size: int | None = None) -> int:
        return int(self.flops_target * models.macs(full_spec, input_size))

    def check_reachable(self, full_spec: Spec, input_size: int | None = None) -> None:
        """Raise a clear error when no subnet can meet the target under the stage limits."""
        floor = models.with_widths(full_spec, self.min_widths(full_spec))
        smallest = models.macs(floor, input_size)
        if smallest > self.target_macs(full_spec, input_size):
            full = models.macs(full_spec, input_size)
            raise SpecError(
                f"FLOPs target {self.flops_target:.3f} is impossible: with max_stage_prune="
                f"{self.max_stage_prune} the smallest width-pruned subnet still has {smallest / full:.3f} "
                f"of the unpruned MACs; raise flops_target or the per-stage pruning rates"
            )


def num_stages(spec: Spec) -> int:
    """How many stages the channel groups of ``spec`` span."""
    return 1 + max(g.stage for g in models.channel_groups(spec))


def stage_rates(full_spec: Spec, spec: Spec) -> list[float]:
    """The realised pruning rate of each stage of ``full_spec`` in its subnet ``spec``:
    ``1 - kept / full`` channels, summed over the stage's channel groups (a block the subnet
    dropped counts as pruned)."""
    full = [0] * num_stages(full_spec)
    kept = [0] * len(full)
    for g in models.channel_groups(full_spec):
        full[g.stage] += g.width
    for g in models.channel_groups(spec):
        if g.stage < len(kept):
            kept[g.stage] += g.width
    return [1.0 - k / f for k, f in zip(kept, full, strict=True)]


def within_budget(
    spec: Spec, full_spec: Spec, budget: Budget, input_size: int | None = None, widths: dict[str, int] | None = None
) -> bool:
    """True when ``spec`` meets the FLOPs target. ``widths`` (group -> width in the *full*
    spec's group naming) additionally checks the per-stage limits for width-only subnets."""
    if models.macs(spec, input_size) > budget.target_macs(full_spec, input_size):
        return False
    if widths is not None:
        mins = budget.min_widths(full_spec)
        return all(widths[g] >= mins[g] for g in widths)
    return True


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class SubnetRecord:
    """One evaluated subnet: plain data, JSON-serialisable.

    ``metrics`` holds at least ``val_top1`` (search-val accuracy, a fraction in [0, 1]) for
    search-time records; final records add ``test_top1``, ``test_top5``, ``robust_top1`` and
    latency entries. ``source`` says where it came from (e.g. ``{"iteration": 3}``).
    """

    spec: Spec
    macs: int
    params: int
    metrics: dict[str, float]
    method: str
    step: int
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls, spec: Spec, metrics: dict[str, float], method: str, step: int, input_size: int | None = None, **source: Any
    ) -> SubnetRecord:
        return cls(
            spec=spec,
            macs=models.macs(spec, input_size),
            params=models.params(spec),
            metrics={k: float(v) for k, v in metrics.items()},
            method=method,
            step=step,
            source=source,
        )

    @property
    def key(self) -> str:
        return spec_hash(self.spec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SubnetRecord:
        return cls(**d)


@dataclass
class StepResult:
    step: int  # 0-based index of the step just completed
    metrics: dict[str, float]
    subnets: list[SubnetRecord]
    done: bool


@dataclass
class FinalResult:
    record: SubnetRecord
    state_dict: dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------------


@dataclass
class RunContext:
    """Everything a method needs besides its hyperparameters.

    ``train``/``test`` are engine datasets (:mod:`rayprune.engine.data`); methods split
    ``train`` into search-train/search-val themselves (the fractions differ per method), and the
    test set is never used for selection. ``finetune`` is the engine ``TrainConfig`` of the final
    phase; its KD weight is ``kd_weight``.
    """

    spec: Spec
    train: Any
    test: Any
    budget: Budget
    kd_weight: float = 0.0
    teacher: nn.Module | None = None
    device: str | torch.device = "cpu"
    seed: int = 0
    workdir: Path | None = None
    finetune: Any = None  # engine.train.TrainConfig; None -> engine defaults
    kd_temperature: float = 4.0
    input_size: int | None = None
    progress: bool | None = None  # None: only when attached to a terminal
    measure_latency: bool = True
    latency_batch_sizes: tuple[int, ...] = (1, 64)
    latency_repeats: int = 20
    robust: bool = True
    robust_max_samples: int | None = None  # None: the whole test set
    initial_state: dict[str, torch.Tensor] | None = None  # the unpruned net's start (pretrained weights)

    def __post_init__(self) -> None:
        models.validate(self.spec)
        if not 0.0 <= self.kd_weight <= 1.0:
            raise InputError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_weight > 0 and self.teacher is None:
            raise InputError("kd_weight > 0 (robust mode) needs a teacher")
        self.budget.check_reachable(self.spec, self.input_size)
        if self.workdir is not None:
            self.workdir = Path(self.workdir)

    def unpruned_net(self, seed: int) -> nn.Module:
        """The unpruned net of ``spec``: ``initial_state`` when given, else initialised from ``seed``."""
        net = models.build(self.spec, seed=seed)
        if self.initial_state is not None:
            net.load_state_dict(self.initial_state)
        return net

    def search_split(self, val_fraction: float) -> tuple[Any, Any]:
        """(search-train, search-val) of the training set: per class, ``val_fraction`` of the
        samples go to search-val (seeded by the run's seed). The test set is never involved."""
        from ..engine.data import split_per_class

        val_idx, train_idx = split_per_class(self.train.labels, val_fraction, self.seed)
        return self.train.subset(train_idx), self.train.subset(val_idx)


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Method(abc.ABC):
    """Base class of every pruning method. Subclasses live one per file in this package."""

    name: ClassVar[str]
    Hparams: ClassVar[type[MethodHparams]] = MethodHparams
    #: True for methods whose final subnet starts from weights sliced out of a bigger net (AST's
    #: target, l1/fpgm's trained net). They refuse ``option_a`` shortcuts: see check_spec().
    inherits_weights: ClassVar[bool] = False
    #: The fine-tune recipe fields a method prefers when the user gives none (``rayprune run``
    #: only; a sweep's ``recipes.finetune`` applies to every method alike).
    finetune_defaults: ClassVar[dict[str, Any]] = {}
    #: Hyperparameters for a seconds-long run (the conformance suite, ``rayprune run --smoke``).
    smoke: ClassVar[dict[str, Any]]
    #: What of the :class:`Budget` a sweep's Optuna study chooses for this method: ``"max_rates"``
    #: (the per-stage maximum rates), ``"allocation"`` (those and a per-stage allocation) or
    #: ``"target"`` (nothing: the FLOPs target alone fixes the subnet, so a cell runs once).
    budget_use: ClassVar[BudgetUse] = "max_rates"

    def __init__(self, ctx: RunContext, hparams: MethodHparams | dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        if hparams is None:
            hparams = self.Hparams()
        elif isinstance(hparams, dict):
            hparams = self.Hparams(**hparams)
        elif not isinstance(hparams, self.Hparams):
            raise TypeError(f"{self.name}: expected {self.Hparams.__name__}, got {type(hparams).__name__}")
        self.hp = hparams
        self.steps_done = 0
        self.check_spec(ctx.spec)

    @classmethod
    def check_spec(cls, spec: Spec) -> None:
        """Refuse a spec this method cannot search faithfully, before any work.

        ``option_a`` shortcuts subsample and zero-pad the residual by channel *position*. A pruned
        width spec cannot express which positions survive, so weights sliced out of the full net
        would feed the shortcut other channels than it was trained with: inherited weights
        would silently be mis-wired.
        """
        if cls.inherits_weights and spec.get("shortcut") == "option_a":
            raise SpecError(
                f"{cls.name} inherits weights, which option_a shortcuts cannot keep aligned after pruning",
                fix="use the shortcut avgpool_conv or conv_bn (sweep files: shortcut: avgpool_conv)",
                hint="shortcut",
            )

    # -- required ------------------------------------------------------------------------------
    @abc.abstractmethod
    def step(self) -> StepResult:
        """Do one unit of work (an iteration or an epoch); return metrics and evaluated subnets."""

    @abc.abstractmethod
    def best(self) -> SubnetRecord:
        """The subnet chosen so far (by search-val accuracy, never test); within the budget."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (weights, optimizers, RNG, counters)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """True once the search is finished (converged or out of steps)."""

    # -- optional ------------------------------------------------------------------------------
    @property
    def planned_steps(self) -> int | None:
        """The most steps this search takes (it may stop earlier, e.g. on convergence), for
        progress display; None when unknown."""
        return None

    def initial_weights(self, record: SubnetRecord) -> dict[str, torch.Tensor] | None:
        """Weights the final fine-tune starts from (None: train from scratch)."""
        return None

    def run(self, max_steps: int | None = None) -> list[StepResult]:
        """Convenience: step until done (or ``max_steps``), no checkpoints. A trial is driven by
        :func:`rayprune.runner.drive` (step -> checkpoint -> report)."""
        results: list[StepResult] = []
        while not self.done and (max_steps is None or len(results) < max_steps):
            results.append(self.step())
        return results
