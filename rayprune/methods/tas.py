"""TAS: Network Pruning via Transformable Architecture Search (Dong & Yang, NeurIPS 2019).

A search super-net gives every conv of a ResNet (``cifar_resnet`` or the ImageNet ``resnet``
family) a categorical distribution over candidate widths (``int(C * r)`` for r in 0.3..1.0) and
every stage one over candidate depths. Each forward samples a Gumbel-softmax, mixes the top-2
sampled widths per conv (prefix slices of one shared filter bank, one BN per candidate width,
channel-wise interpolation to align them) and mixes the candidate stage ends. Weights are
trained on one half of the training set, the architecture logits on the other with cross-entropy
plus a FLOPs cost loss on a differentiable expected-MACs relaxation. The argmax of the logits
("genotype") is the pruned network; it is trained from scratch with KD from the unpruned teacher
(the shared :func:`~rayprune.methods.finetune.finalize`). The super-net is :mod:`rayprune.methods.tas_supernet`; it
reads a family only through the family's hooks (:meth:`rayprune.models.Family.residual_net`).

Follows the paper and its reference code (D-X-Y/AutoDL-Projects, ``SearchCifarResNet``), with:

* the 2020 fix: ReLU after every search block's residual add;
* the stride-2 shortcut of the super-net is AvgPool(2) + 1x1 conv with **no** BN (the reference
  search forward applies per-candidate BNs there; the paper's shortcut has none, and so does the
  genotype);
* the cost loss decides with the **true** MACs of the built genotype (``models.macs``), the same
  number the budget and the reports use, instead of the reference's analytic ``estimated_FLOP``
  (they differ only when depth is pruned: see :meth:`SearchResNet.genotype`);
* a genotype's ``val_top1`` is the accuracy on search-val of the super-net restricted to that
  genotype (argmax width per conv, argmax depth per stage, BN statistics re-estimated on a few
  search-train batches), not the reference's stochastic super-net accuracy (that one is logged
  as ``search_val_top1``);
* per-stage maximum pruning rates remove width candidates below ``ceil(C * (1 - rate))``; depth
  is not limited by them (dropping a block is not "pruning a fraction of its channels").
* ImageNet ``resnet`` (the reference ``SearchImagenetResNet`` layout: 7x7 stride-2 stem + max-pool,
  stride in the 3x3 conv of bottlenecks, depth candidates ``imagenet_depth_candidates``): the
  super-net's downsample is torchvision's strided 1x1 conv with one BN per candidate width, not the
  reference's average-pooled one, so that a genotype is an ordinary ``resnet`` spec (and its
  downsample keeps torchvision's form); its expected-MACs term is the CIFAR stride-2 shortcut's.
  The paper's ImageNet search schedule (120 epochs, ``w_wd=1e-4``) is not the default: set it.
* in both families a genotype block whose input and output widths differ gets the family's
  stride-1 1x1 conv + BN projection; the super-net has an identity (zero-padded add) there, as the
  reference code, and its expected MACs leave that projection out.

**The budget.** The FLOPs target drives the cost loss and the choice of the genotype; the
per-stage maximum rates are hard floors on the width candidates (above); an ``allocation`` is
not used (the architecture logits decide how the pruning spreads over the stages).

Expected result (paper, 600 search + 300 training epochs): ResNet-56 / CIFAR-10 at 47% of the
MACs reaches 93.69% top-1 (5.95E7 MACs).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from .. import models
from ..engine.data import Dataset, make_loader, split_per_class
from ..engine.train import (
    TrainConfig,
    autocast,
    evaluate,
    make_optimizer,
    make_scheduler,
    recalibrate_bn,
    recalibration_batches,
)
from ..engine.utils import derive_seed
from ..errors import InputError
from ..grid import TargetWindow
from ..models.base import Spec, spec_hash
from .base import Method, MethodHparams, RunContext, StepResult, SubnetRecord, within_budget
from .tas_supernet import (
    WIDTH_RATIOS,
    FixedPath,
    SearchBlock,
    SearchConv,
    SearchResNet,
    grow_to_window,
    require_residual_net,
    shrink_to_budget,
)

__all__ = ["TAS", "TASHparams", "cost_loss", "tau_at"]

# --------------------------------------------------------------------------------------------
# Schedules and the cost loss
# --------------------------------------------------------------------------------------------


def tau_at(
    epoch: int,
    epochs: int,
    tau_max: float = 5.0,
    tau_min: float = 0.1,
    schedule: Literal["cosine", "linear"] = "cosine",
) -> float:
    """Gumbel temperature for 0-based ``epoch`` of ``epochs`` (set once per epoch, as TAS).

    cosine (reference code): ``tau_min + (tau_max - tau_min) * (1 + cos(pi * e / E)) / 2``;
    linear (paper, there with tau_max=10): ``tau_max - (tau_max - tau_min) * e / E``.
    """
    ratio = epoch / max(1, epochs)
    if schedule == "cosine":
        return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * ratio)) / 2
    return tau_max - (tau_max - tau_min) * ratio


def cost_loss(
    expected_macs: torch.Tensor,
    current_macs: int,
    target_macs: float,
    max_macs: int,
    tolerance: float = 0.05,
    mode: Literal["code", "paper"] = "code",
) -> torch.Tensor:
    """TAS's FLOPs loss on the expected MACs (millions), decided by the argmax genotype's MACs.

    * ``code`` (released code): +log E above the target; -log E below ``target - tolerance * max``;
      zero in between (no upper tolerance).
    * ``paper``: +log E above ``(1 + t) * target``; -log E below ``(1 - t) * target``.
    """
    if mode == "code":
        high, low = target_macs, target_macs - tolerance * max_macs
    else:
        high, low = (1 + tolerance) * target_macs, (1 - tolerance) * target_macs
    if current_macs > high:
        return torch.log(expected_macs / 1e6)
    if current_macs < low:
        return -torch.log(expected_macs / 1e6)
    return expected_macs.new_zeros(())


@contextlib.contextmanager
def _frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily stop gradients to ``params`` (saves their backward in the other player's step)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


class TASHparams(MethodHparams):
    """TAS hyperparameters (defaults: the reference code's CIFAR search)."""

    epochs: int = Field(600, ge=1, description="search epochs (one step() each)")
    batch_size: int = Field(256, ge=2, description="batch of the weight step and of the arch step")
    eval_batch_size: int = Field(512, ge=1)
    bn_recalibration_batches: int = Field(10, ge=0, description="BN re-estimation before scoring a genotype")
    w_lr: float = Field(0.1, gt=0)
    w_momentum: float = Field(0.9, ge=0, lt=1)
    w_wd: float = Field(5e-4, ge=0)
    nesterov: bool = True
    arch_lr: float = Field(1e-3, gt=0)
    arch_wd: float = Field(1e-3, ge=0)
    arch_betas: tuple[float, float] = (0.5, 0.999)
    tau_max: float = Field(5.0, gt=0)
    tau_min: float = Field(0.1, gt=0)
    tau_schedule: Literal["cosine", "linear"] = "cosine"
    flop_weight: float = Field(2.0, ge=0)
    flop_tolerance: float = Field(0.05, ge=0, lt=1)
    tolerance_mode: Literal["code", "paper"] = "code"
    width_ratios: tuple[float, ...] = WIDTH_RATIOS
    num_sampled_widths: int = Field(2, ge=1)
    search_width: bool = True
    search_depth: bool = True
    val_fraction: float = Field(0.5, gt=0, lt=1, description="per-class share of the training set for arch steps")
    select: Literal["last", "best"] = "last"
    amp: bool = Field(True, description="bf16 autocast on CUDA (no effect on CPU)")

    @model_validator(mode="after")
    def _check(self) -> TASHparams:
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be <= tau_max ({self.tau_max})")
        if not self.width_ratios or not all(0 < r <= 1 for r in self.width_ratios):
            raise ValueError(f"width_ratios must be non-empty fractions in (0, 1], got {self.width_ratios}")
        return self


class TAS(Method):
    """Transformable architecture search over per-conv widths and per-stage depths.

    One :meth:`step` is one search epoch. Every distinct epoch-end genotype is reported once as a
    :class:`SubnetRecord` (``val_top1`` = its single-path search-val accuracy). :meth:`best`:
    with ``select="last"`` the last genotype if it meets the budget; otherwise (or with
    ``select="best"``) the in-budget genotype with the highest ``val_top1``, preferring those
    within ``flop_tolerance`` of the target; if none is in budget, the last genotype shrunk
    greedily until it fits. A choice below the target window (``[0.9, 1] x target`` MACs) is widened
    into it (:func:`grow_to_window`) and re-scored. The final net is trained from
    scratch (``initial_weights`` is None).
    """

    name = "tas"
    Hparams: ClassVar[type[MethodHparams]] = TASHparams

    @classmethod
    def check_spec(cls, spec: Spec) -> None:
        """Also refuse a family without residual blocks, before any data is loaded."""
        super().check_spec(spec)
        require_residual_net(spec)

    smoke: ClassVar[dict] = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64}
    hp: TASHparams

    def __init__(self, ctx: RunContext, hparams: MethodHparams | dict[str, Any] | None = None) -> None:
        super().__init__(ctx, hparams)
        hp, self.device = self.hp, torch.device(ctx.device)
        rates = ctx.budget.max_stage_prune
        with torch.random.fork_rng(devices=[]):  # weight/arch init depends on the run seed only
            torch.manual_seed(derive_seed(ctx.seed, 0))
            self.net = SearchResNet(
                ctx.spec,
                ctx.input_size,
                hp.width_ratios,
                rates,
                hp.search_width,
                hp.search_depth,
                hp.num_sampled_widths,
            ).to(self.device)
        self.gen = torch.Generator().manual_seed(derive_seed(ctx.seed, 1))
        self.max_macs = models.macs(ctx.spec, ctx.input_size)
        self.target_macs = ctx.budget.target_macs(ctx.spec, ctx.input_size)
        self.search_train, self.search_val = self._split()
        self.train_loader = make_loader(
            self.search_train, hp.batch_size, train=True, device=self.device, seed=derive_seed(ctx.seed, 2)
        )
        self.arch_loader = make_loader(
            self.search_val, hp.batch_size, train=True, device=self.device, seed=derive_seed(ctx.seed, 3)
        )
        cfg = TrainConfig(
            epochs=hp.epochs,
            lr=hp.w_lr,
            momentum=hp.w_momentum,
            nesterov=hp.nesterov,
            weight_decay=hp.w_wd,
            schedule="cosine",
        )
        self.w_opt = make_optimizer(self.net.weight_parameters(), cfg)  # decay on all weights, as TAS
        self.w_sched = make_scheduler(self.w_opt, cfg, len(self.train_loader))
        self.a_opt = torch.optim.Adam(
            self.net.arch_parameters(), lr=hp.arch_lr, betas=hp.arch_betas, weight_decay=hp.arch_wd
        )
        self.seen: dict[str, SubnetRecord] = {}
        self.last_key = ""
        self._macs_cache: dict[str, int] = {}
        self._grown: dict[str, SubnetRecord] = {}  # below-window genotype key -> its widened record

    def _split(self) -> tuple[Dataset, Dataset]:
        labels = self.ctx.train.labels
        val_idx, train_idx = split_per_class(labels, self.hp.val_fraction, self.ctx.seed)
        if len(train_idx) == 0 or len(val_idx) == 0:
            raise InputError(
                f"tas: val_fraction={self.hp.val_fraction} leaves an empty search half "
                f"({len(labels)} training samples); use more data or a fraction nearer 0.5"
            )
        return self.ctx.train.subset(train_idx), self.ctx.train.subset(val_idx)

    @property
    def planned_steps(self) -> int:
        return self.hp.epochs

    @property
    def done(self) -> bool:
        return self.steps_done >= self.hp.epochs

    # -- one search epoch ----------------------------------------------------------------------
    def step(self) -> StepResult:
        epoch = self.steps_done
        hp = self.hp
        tau = tau_at(epoch, hp.epochs, hp.tau_max, hp.tau_min, hp.tau_schedule)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # nothing may read the caller's global RNG
            torch.manual_seed(derive_seed(self.ctx.seed, 4, epoch))
            metrics = self._search_epoch(epoch, tau)
            record, is_new = self._observe(epoch)
        self.steps_done += 1
        with torch.no_grad():
            expected = float(self.net.expected_macs())
        metrics.update(
            tau=tau,
            w_lr=self.w_opt.param_groups[0]["lr"],
            val_top1=record.metrics["val_top1"],
            macs=float(record.macs),
            macs_ratio=record.macs / self.max_macs,
            target_ratio=self.target_macs / self.max_macs,
            expected_macs=expected,
            expected_ratio=expected / self.max_macs,
            discrepancy=self.net.discrepancy(),
            in_budget=float(record.source["in_budget"]),
            params=float(record.params),
            **{f"depth_{s}": float(d) for s, d in enumerate(self.net.depths(record.spec))},
        )
        return StepResult(step=epoch, metrics=metrics, subnets=[record] if is_new else [], done=self.done)

    def _val_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The arch half is cycled as often as the weight half needs; each pass reseeded by (epoch, pass).
        for k in itertools.count():
            self.arch_loader.set_epoch(epoch * 1000 + k)
            yield from self.arch_loader

    def _search_epoch(self, epoch: int, tau: float) -> dict[str, float]:
        self.net.train()
        self.train_loader.set_epoch(epoch)
        sums = {
            k: torch.zeros((), device=self.device)
            for k in ("train_loss", "train_top1", "arch_ce", "cost_loss", "search_val_top1")
        }
        n = 0
        for (x, y), (xv, yv) in zip(self.train_loader, self._val_batches(epoch), strict=False):
            loss, hits = self._weight_step(x, y, tau)
            ce, cost, val_hits = self._arch_step(xv, yv, tau)
            for key, value in (
                ("train_loss", loss),
                ("train_top1", hits),
                ("arch_ce", ce),
                ("cost_loss", cost),
                ("search_val_top1", val_hits),
            ):
                sums[key] += value
            n += 1
        out = {k: float(v) / max(1, n) for k, v in sums.items()}  # means of per-batch values
        if not math.isfinite(out["train_loss"]):
            raise FloatingPointError(f"tas: the search diverged in epoch {epoch}; lower w_lr")
        return out

    def _weight_step(self, x: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        with _frozen(self.net.arch_parameters()), autocast(self.device, self.hp.amp):
            logits = self.net(x, self.net.sample(tau, self.gen)).float()
        loss = F.cross_entropy(logits, y)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.w_opt.step()
        self.w_sched.step()
        return loss.detach(), self._hits(logits, y)

    def _arch_step(self, x: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
        hp = self.hp
        with _frozen(self.net.weight_parameters()):
            with autocast(self.device, hp.amp):
                logits = self.net(x, self.net.sample(tau, self.gen)).float()
            ce = F.cross_entropy(logits, y)
            current = self._macs(self.net.genotype())
            cost = cost_loss(
                self.net.expected_macs(), current, self.target_macs, self.max_macs, hp.flop_tolerance, hp.tolerance_mode
            )
            loss = ce + hp.flop_weight * cost
            self.a_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.a_opt.step()
        return ce.detach(), cost.detach().float(), self._hits(logits, y)

    @staticmethod
    def _hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == y).float().mean()  # stays on the device: no sync per step

    def _macs(self, spec: Spec) -> int:
        key = spec_hash(spec)
        if key not in self._macs_cache:
            if len(self._macs_cache) > 4096:
                self._macs_cache.clear()
            self._macs_cache[key] = models.macs(spec, self.ctx.input_size)
        return self._macs_cache[key]

    # -- genotypes and selection ---------------------------------------------------------------
    def _val_top1(self, spec: Spec) -> float | None:
        """Search-val top-1 of the super-net restricted to ``spec`` (None if that is impossible).

        Running BN statistics accumulated under the search mixture do not match a single path,
        so a copy of the net first re-estimates them on ``bn_recalibration_batches`` batches of a
        seeded random search-train subset (as one-shot NAS evaluations do); the search state is left untouched.
        """
        sample = self.net.fixed_sample(spec)
        if sample is None:
            return None
        path = FixedPath(copy.deepcopy(self.net), sample)
        if self.hp.bn_recalibration_batches:
            self._recalibrate_bn(path)
        result = evaluate(
            path, self.search_val, device=self.device, batch_size=self.hp.eval_batch_size, amp=self.hp.amp
        )
        return float(result["top1"])

    def _recalibrate_bn(self, path: nn.Module) -> None:
        hp = self.hp
        batches = recalibration_batches(
            self.search_train,
            hp.bn_recalibration_batches * hp.batch_size,
            hp.batch_size,
            device=self.device,
            seed=derive_seed(self.ctx.seed, "recalib"),
        )
        with autocast(self.device, hp.amp):
            recalibrate_bn(path, batches)

    def _record(self, spec: Spec, val: float, step: int, **source: Any) -> SubnetRecord:
        ctx = self.ctx
        in_budget = within_budget(spec, ctx.spec, ctx.budget, ctx.input_size)
        return SubnetRecord.of(spec, {"val_top1": val}, self.name, step, ctx.input_size, in_budget=in_budget, **source)

    def _observe(self, epoch: int) -> tuple[SubnetRecord, bool]:
        """Evaluate the current genotype; remember it (keeping its best val_top1)."""
        spec = self.net.genotype()
        val = self._val_top1(spec)
        assert val is not None, "an argmax genotype only has candidate widths"
        record = self._record(spec, val, epoch, epoch=epoch)
        key, is_new = record.key, record.key not in self.seen
        if is_new or record.metrics["val_top1"] > self.seen[key].metrics["val_top1"]:
            first = epoch if is_new else self.seen[key].step
            self.seen[key] = self._record(spec, record.metrics["val_top1"], first, epoch=epoch)
        self.last_key = key
        return record, is_new

    def best(self) -> SubnetRecord:
        if not self.last_key:
            self._observe(self.steps_done)
        last = self.seen[self.last_key]
        if self.hp.select == "last" and last.source["in_budget"]:
            return self._in_window(last)
        fitting = [r for r in self.seen.values() if r.source["in_budget"]]
        if fitting:
            floor = self.target_macs - self.hp.flop_tolerance * self.max_macs
            pool = [r for r in fitting if r.macs >= floor] or fitting
            return self._in_window(max(pool, key=lambda r: (r.metrics["val_top1"], r.step)))
        return self._in_window(self._shrunk(last))

    def _in_window(self, record: SubnetRecord) -> SubnetRecord:
        """The reported subnet lands in its :class:`~rayprune.grid.TargetWindow`: a
        genotype that settled below it is widened (:func:`grow_to_window`) and re-scored on
        search-val; one that cannot reach the window stays as it is (orchestrators record that)."""
        low = TargetWindow(self.target_macs).low_macs
        if record.macs >= low:
            return record
        if record.key not in self._grown:
            spec = grow_to_window(self.net, record.spec, self.target_macs, low, self.ctx.input_size)
            val = self._val_top1(spec) if spec != record.spec else None
            self._grown[record.key] = (
                record if val is None else self._record(spec, val, record.step, grown_from=record.key)
            )
        return self._grown[record.key]

    def _shrunk(self, record: SubnetRecord) -> SubnetRecord:
        """Step widths down (largest-MAC conv first; through the candidates, then to the budget's
        floor width), then depths, until the genotype fits the budget."""
        spec = shrink_to_budget(self.net, record.spec, self._floors(), self.target_macs, self.ctx.input_size)
        val = self._val_top1(spec)
        source = {"shrunk_from": record.key}
        if val is None:  # a floor width has no BN in the super-net: keep the unshrunk genotype's score
            val, source["val_top1_of"] = record.metrics["val_top1"], "unshrunk genotype"
        return self._record(spec, val, record.step, **source)

    def _floors(self) -> list[int]:
        """Per width row, the narrowest width the budget's per-stage rates allow."""
        rates = self.ctx.budget.max_stage_prune
        floors = []
        for conv in self._row_convs():
            rate = 1.0 if rates is None else rates[conv[1]]
            floors.append(max(1, math.ceil(conv[0] * (1.0 - rate) - 1e-9)))
        return floors

    def _row_convs(self) -> list[tuple[int, int]]:
        """(full width, stage) per width row."""
        out = [(self.net.stem.conv.out_channels, 0)]
        for s, stage in enumerate(cast("Iterable[nn.ModuleList]", self.net.stages)):
            for block in cast("Iterable[SearchBlock]", stage):
                out += [(c.conv.out_channels, s) for c in cast("Iterable[SearchConv]", block.convs)]
        return out

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "w_sched": self.w_sched.state_dict(),
            "a_opt": self.a_opt.state_dict(),
            "gen": self.gen.get_state(),
            "steps_done": self.steps_done,
            "seen": [r.to_dict() for r in self.seen.values()],
            "last_key": self.last_key,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.w_opt.load_state_dict(state["w_opt"])
        self.w_sched.load_state_dict(state["w_sched"])
        self.a_opt.load_state_dict(state["a_opt"])
        self.gen.set_state(state["gen"])
        self.steps_done = int(state["steps_done"])
        self.seen = {r.key: r for r in (SubnetRecord.from_dict(d) for d in state["seen"])}
        self.last_key = str(state["last_key"])
