"""SP: stage-wise pruning (Zhang, Yu, Rong, Ou; arXiv 2011.04908, MIR 2023). The paper
publishes no code: every detail it leaves open is a hyperparameter (defaults below).

Pipeline (one :meth:`SP.step` per unit, so orchestrators can report and checkpoint in between):

1. **Full-net.** ``ctx.teacher`` (the pre-trained unpruned net of ``ctx.spec``); without one, a
   step trains it for ``pretrain_epochs`` on search-train. The super-net starts from its weights.
2. **Stage super-nets** (one step = one epoch of one stage). The net is split at resolution
   changes (:func:`stage_layout`); each stage is trained alone on the teacher's features of the
   previous stage. Widths are searched per channel group (each block's inner width, one shared
   output width per stage) and a subnet is the full net with **prefix channel masks** applied
   after every producer (:class:`MaskedSupernet`). Every batch uses the sandwich rule: the full
   config, the tiny config and ``n_random`` random ones. The full path learns the teacher's stage
   output (MSE); the others learn the detached full path (in-place distillation, MSE;
   ``teacher_mode="external"``: the teacher's output). The last stage adds CE for the full path
   and KL to the full path's logits for the others. Losses compare the kept (prefix) channels.
3. **Evolutionary search** (one step = one generation): candidates within
   ``[flops_window_low, 1] * target`` MACs, each scored by its proxy, the top-1 of the chained
   subnet on a per-class holdout of the training set after BN recalibration; the summed stage
   losses against the teacher are logged as a second proxy (``proxy_loss``).
4. **Final training** from scratch with KD through the shared engine (:func:`.finetune.finalize`).

:func:`proxy_rank_correlation` measures SP's central claim, the Kendall tau between the proxy
and the accuracy of the same archs trained for real.

**The budget.** The FLOPs target sets the search's window; the per-stage maximum rates are hard
floors on every channel group's candidate widths (:class:`WidthSpace`); an ``allocation`` is not
used (the evolutionary search decides how the pruning spreads over the stages).

Choices for what the paper leaves open: MSE stage loss; ratio set {0.1, ..., 1.0}; a stage's
input width is simulated by masking the teacher's input features with the previous stage's
output width (so chained subnets see what they were trained on); KL at T=1 for the last stage;
cached teacher features (when they fit ``teacher_cache_mb``) are computed once on un-augmented
search-train images, otherwise they are computed per batch on augmented ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from .. import models
from ..engine.data import holdout_per_class, make_loader
from ..engine.train import (
    TrainConfig,
    autocast,
    evaluate,
    fit,
    lr_factor,
    make_optimizer,
    recalibrate_bn,
    recalibration_batches,
)
from ..engine.utils import bn_layers, derive_seed, resolve_device
from ..errors import InputError, RaypruneError
from ..models.base import Fixup, Spec, SpecError, StageSplit, round_to
from ..models.tiles import first_channels
from ._baseline import fit_multiplier
from .base import Method, MethodHparams, RunContext, StepResult, SubnetRecord

Widths = dict[str, int]
Genes = list[int]


class SPHparams(MethodHparams):
    # super-net training (the paper does not give its values; these are the usual CIFAR ones)
    stage_epochs: int = Field(100, ge=1, description="super-net training epochs per stage")
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.05, gt=0, description="SGD lr (cosine per stage)")
    wd: float = Field(5e-5, ge=0, description="weight decay (none on BN and biases)")
    n_random: int = Field(2, ge=0, description="random configs per batch besides the full and tiny ones")
    teacher_mode: Literal["inplace", "external"] = Field(
        "inplace", description="sub-nets learn the detached full path (inplace) or the teacher (external)"
    )
    init_from_teacher: bool = Field(True, description="start the super-net from the teacher's weights")
    pretrain_epochs: int = Field(30, ge=1, description="full-net epochs when ctx.teacher is None")
    pretrain_lr: float = Field(0.1, gt=0)
    teacher_cache_mb: float = Field(512.0, ge=0, description="cache teacher features when they fit, else per batch")
    # search space and proxy
    ratios: tuple[float, ...] = Field(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        description="width ratios of each channel group (genes index them)",
    )
    recalib_images: int = Field(2000, ge=1, description="training images for BN recalibration")
    proxy_per_class: int = Field(200, ge=1, description="held-out training images per class for the proxy")
    eval_batch_size: int = Field(500, ge=1)
    # evolution (MetaPruning/SPOS defaults)
    population: int = Field(50, ge=1)
    generations: int = Field(20, ge=1, description="evaluated generations, the first one random")
    parents: int = Field(10, ge=1, description="top-k of all evaluated candidates")
    mutation_children: int = Field(25, ge=0)
    crossover_children: int = Field(25, ge=0)
    mutation_prob: float = Field(0.1, ge=0, le=1)
    flops_window_low: float = Field(0.97, gt=0, le=1, description="candidates need MACs >= this * target")
    sample_retries: int = Field(200, ge=1, description="restarts when sampling into the FLOPs window")
    rank_archs: int = Field(
        0,
        ge=0,
        description="after the search, Kendall tau of proxy vs real accuracy on this "
        "many random in-window archs (0: off; SP's central claim)",
    )
    rank_epochs: int = Field(5, ge=1, description="training epochs of each arch of the Kendall tau check")

    @field_validator("ratios")
    @classmethod
    def _ratios_sorted(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < r <= 1 for r in v) or list(v) != sorted(set(v)):
            raise ValueError(f"ratios must be distinct, increasing and in (0, 1], got {list(v)}")
        return v

    @model_validator(mode="after")
    def _parents_fit(self) -> SPHparams:
        if self.parents > self.population:
            raise ValueError(f"parents ({self.parents}) must be <= population ({self.population})")
        return self


# --------------------------------------------------------------------------------------------
# Kendall tau
# --------------------------------------------------------------------------------------------


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt(pairs untied in x * pairs untied in y).

    Pairs tied in both count in neither. NaN when either sequence is constant.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"kendall_tau_b needs two equally long sequences of >= 2 values, got {a.shape}, {b.shape}")
    upper = np.triu_indices(len(a), 1)
    da = np.sign(a[:, None] - a[None, :])[upper]
    db = np.sign(b[:, None] - b[None, :])[upper]
    denom = math.sqrt(np.count_nonzero(da) * np.count_nonzero(db))
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Stages of a family
# --------------------------------------------------------------------------------------------


def stage_layout(spec: Spec, model: nn.Module) -> StageSplit:
    """The stages of ``model`` (built from ``spec``): its family's :meth:`~rayprune.models.Family.stage_split`;
    raises for families that declare none."""
    return require_stage_split(spec).stage_split(spec, model)


def require_stage_split(spec: Spec) -> models.Family:
    """The spec's family, or a one-line refusal when it declares no stage split or cannot derive
    one for this spec (a traced network's graph: tried on a net built on the meta device)."""
    family = models.family_of(spec)
    if not family.implements("stage_split"):
        supported = sorted(n for n in models.FAMILIES if models.FAMILIES.get(n).implements("stage_split"))
        raise SpecError(f"sp: no stage layout for family {family.name!r}; supported: {', '.join(supported)}")
    try:
        with torch.device("meta"):
            shapes_only = models.build(spec)
    except SpecError:  # a factory that cannot build without data: the split is derived at run time
        return family
    family.stage_split(spec, shapes_only)
    return family


# --------------------------------------------------------------------------------------------
# The masked super-net
# --------------------------------------------------------------------------------------------


def producers(spec: Spec) -> dict[str, str]:
    """Module name -> channel group it produces: every ``X.weight`` whose axis 0 is a group."""
    return {
        key[: -len(".weight")]: axes[0]
        for key, axes in models.tensor_axes(spec).items()
        if key.endswith(".weight") and axes and axes[0] is not None
    }


class MaskedSupernet:
    """The full network of ``spec`` computing any prefix-width subnet.

    After :meth:`set_widths`, each producer's output (conv, BN) is multiplied by its group's
    prefix mask (a prefix of each block for a grouped conv's group, :mod:`~rayprune.models.tiles`).
    BN is per channel, so in eval mode this equals the physically sliced subnet
    (``extract_subnet`` with prefix keeps) and in train mode the kept channels see the same
    batch statistics.
    """

    def __init__(self, spec: Spec, model: nn.Module, layout: StageSplit) -> None:
        self.spec, self.model, self.layout = spec, model, layout
        self.full: Widths = {g.name: g.width for g in models.channel_groups(spec)}
        self.tiles: Widths = {g.name: g.tiles for g in models.channel_groups(spec)}
        self.widths: Widths | None = None
        self._masks: dict[str, torch.Tensor] = {}
        for name, group in producers(spec).items():
            model.get_submodule(name).register_forward_hook(self._mask_hook(group))
        for name, fix in layout.fixups.items():
            model.get_submodule(name).register_forward_hook(self._fixup_hook(fix))

    def set_widths(self, widths: Widths | None) -> None:
        """Select a subnet (group -> width); None (or the full widths) selects the full net."""
        self.widths = None if widths is None or widths == self.full else dict(widths)
        device = next(self.model.parameters()).device
        self._masks = {g: self.mask(g, w, device) for g, w in (self.widths or {}).items() if w < self.full[g]}

    def mask(self, group: str, width: int, device: torch.device) -> torch.Tensor:
        """A [1, C, 1, 1] prefix mask keeping ``width`` of the group's channels."""
        if self.tiles[group] == 1:
            return (torch.arange(self.full[group], device=device) < width).float().view(1, -1, 1, 1)
        mask = torch.zeros(self.full[group], device=device)
        mask[first_channels(self.full[group], width, self.tiles[group]).to(device)] = 1.0
        return mask.view(1, -1, 1, 1)

    def kept(self, features: torch.Tensor, group: str, width: int) -> torch.Tensor:
        """The channels of ``features`` (``[N, C, ...]``, C the group's) that a subnet keeps."""
        if self.tiles[group] == 1:
            return features[:, :width]
        return features.index_select(1, first_channels(self.full[group], width, self.tiles[group]).to(features.device))

    def input_mask(self, stage: int, widths: Widths, device: torch.device) -> torch.Tensor | None:
        """Mask of stage ``stage``'s input (the previous stage's output width); None when full."""
        if stage == 0:
            return None
        group = self.layout.boundary[stage - 1]
        return self.mask(group, widths[group], device) if widths[group] < self.full[group] else None

    def _mask_hook(self, group: str) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            mask = self._masks.get(group)
            return None if mask is None else output * mask.view(1, -1, *([1] * (output.dim() - 2)))

        return hook

    def _fixup_hook(self, fix: Fixup) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return None if self.widths is None else fix(module, inputs, output, self.widths)

        return hook


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------


class SearchError(RaypruneError):
    """The FLOPs window cannot be reached by the candidate generator."""


class WidthSpace:
    """Genes (one ratio index per channel group) <-> widths, and sampling inside the FLOPs window.

    A gene's width is ``round_to(ratio * width, divisor)`` clipped to [min width, width]; genes
    that clip to the same widths are the same candidate (:meth:`key`).
    """

    def __init__(
        self, spec: Spec, ratios: Sequence[float], mins: Widths, window: tuple[float, float], input_size: int | None
    ) -> None:
        self.spec, self.window, self.input_size = spec, window, input_size
        self.groups = models.channel_groups(spec)
        self.table = [
            [min(g.width, max(mins[g.name], round_to(r * g.width, g.divisor))) for r in ratios] for g in self.groups
        ]
        self.full: Widths = {g.name: g.width for g in self.groups}

    @property
    def choices(self) -> int:
        return len(self.table[0])

    def widths(self, genes: Sequence[int]) -> Widths:
        return {g.name: row[i] for g, row, i in zip(self.groups, self.table, genes, strict=True)}

    def key(self, genes: Sequence[int]) -> tuple[int, ...]:
        return tuple(row[i] for row, i in zip(self.table, genes, strict=True))

    def macs(self, genes: Sequence[int]) -> int:
        return models.macs(models.with_widths(self.spec, self.widths(genes)), self.input_size)

    def in_window(self, genes: Sequence[int]) -> bool:
        return self.window[0] <= self.macs(genes) <= self.window[1]

    def tiny(self) -> Widths:
        return self.widths([0] * len(self.groups))

    def random(self, gen: torch.Generator) -> Genes:
        return torch.randint(self.choices, (len(self.groups),), generator=gen).tolist()

    def sample(self, gen: torch.Generator, retries: int) -> Genes:
        """A random candidate inside the window: random genes, then a random walk that shrinks
        (too many MACs) or grows (too few) one random gene at a time; restarts ``retries`` times."""
        moves = 4 * len(self.groups) * self.choices
        for _ in range(retries):
            genes = self.random(gen)
            for _ in range(moves):
                m = self.macs(genes)
                if self.window[0] <= m <= self.window[1]:
                    return genes
                shrink = m > self.window[1]
                movable = [i for i, x in enumerate(genes) if (x > 0 if shrink else x < self.choices - 1)]
                if not movable:
                    break
                i = movable[int(torch.randint(len(movable), (1,), generator=gen))]
                genes[i] += -1 if shrink else 1
        lo, hi = self.window
        raise SearchError(
            f"sp: no candidate with MACs in [{lo:.0f}, {hi:.0f}] found after {retries} restarts; "
            "lower flops_window_low, use a finer ratio set or raise sample_retries"
        )

    def mutate(self, parent: Sequence[int], prob: float, gen: torch.Generator) -> Genes:
        flip = torch.rand(len(parent), generator=gen) < prob
        fresh = self.random(gen)
        return [f if m else p for p, f, m in zip(parent, fresh, flip.tolist(), strict=True)]

    @staticmethod
    def crossover(a: Sequence[int], b: Sequence[int], gen: torch.Generator) -> Genes:
        pick = torch.rand(len(a), generator=gen) < 0.5
        return [x if m else y for x, y, m in zip(a, b, pick.tolist(), strict=True)]


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


def _pick(n: int, gen: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=gen))


class SP(Method):
    """Stage-wise super-nets supervised by the full net, then an evolutionary search."""

    name = "sp"
    Hparams: ClassVar[type[MethodHparams]] = SPHparams

    @classmethod
    def check_spec(cls, spec: Spec) -> None:
        """Also refuse a family without a stage split, before any data is loaded."""
        super().check_spec(spec)
        require_stage_split(spec)

    smoke: ClassVar[dict] = {
        "stage_epochs": 1,
        "batch_size": 32,
        "pretrain_epochs": 1,
        "recalib_images": 32,
        "proxy_per_class": 8,
        "eval_batch_size": 64,
        "population": 6,
        "generations": 2,
        "parents": 3,
        "mutation_children": 3,
        "crossover_children": 3,
        "sample_retries": 20,
    }
    hp: SPHparams

    def __init__(self, ctx: RunContext, hparams: MethodHparams | dict[str, Any] | None = None) -> None:
        super().__init__(ctx, hparams)
        hp = self.hp
        self.device = resolve_device(ctx.device)
        rest, held = holdout_per_class(ctx.train.labels, hp.proxy_per_class, ctx.seed)
        self.search_train, self.holdout = ctx.train.subset(rest), ctx.train.subset(held)
        self.target = ctx.budget.target_macs(ctx.spec, ctx.input_size)
        self.space = WidthSpace(
            ctx.spec,
            hp.ratios,
            ctx.budget.min_widths(ctx.spec),
            (hp.flops_window_low * self.target, self.target),
            ctx.input_size,
        )
        self.gen = torch.Generator().manual_seed(ctx.seed)
        model = models.build(ctx.spec, seed=derive_seed(ctx.seed, "supernet")).to(self.device)
        self.net = MaskedSupernet(ctx.spec, model, stage_layout(ctx.spec, model))
        self.teacher: nn.Module | None = None
        if ctx.teacher is not None:
            self._set_teacher(ctx.teacher.state_dict())
        n_stages = len(self.net.layout.stages)
        self.plan: list[tuple[str, int, int]] = (
            ([("pretrain", 0, 0)] if ctx.teacher is None else [])
            + [("train", s, e) for s in range(n_stages) for e in range(hp.stage_epochs)]
            + [("search", g, 0) for g in range(hp.generations)]
        )
        self.evaluated: dict[tuple[int, ...], dict[str, Any]] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._cache: dict[Any, Any] = {}

    # -- teacher ----------------------------------------------------------------------------------
    def _set_teacher(self, state: dict[str, torch.Tensor], init_supernet: bool = True) -> None:
        teacher = models.build(self.ctx.spec, seed=0)
        try:
            teacher.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(
                "sp: the teacher must be the unpruned network of ctx.spec (its stage features "
                f"supervise the stage super-nets), but its weights do not fit: {e}"
            ) from None
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.teacher_layout = stage_layout(self.ctx.spec, self.teacher)
        if init_supernet and self.hp.init_from_teacher:
            self.net.model.load_state_dict(self.teacher.state_dict())

    def _pretrain(self) -> dict[str, float]:
        hp, ctx = self.hp, self.ctx
        seed = derive_seed(ctx.seed, "pretrain")
        model = models.build(ctx.spec, seed=seed).to(self.device)
        cfg = TrainConfig(epochs=hp.pretrain_epochs, batch_size=hp.batch_size, lr=hp.pretrain_lr)
        ckpt = ctx.workdir / "sp_pretrain" if ctx.workdir is not None else None
        history = fit(
            model,
            self.search_train,
            cfg,
            device=self.device,
            seed=seed,
            checkpoint_dir=ckpt,
            progress=self.ctx.progress,
        )
        self._set_teacher(model.state_dict())
        return {"pretrain_loss": history[-1]["loss"]}

    @torch.no_grad()
    def _teacher_features(self, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """The teacher's outputs of stages 0..upto for images ``x``."""
        feats = []
        for stage in self.teacher_layout.stages[: upto + 1]:
            x = stage(x)
            feats.append(x)
        return feats

    def _fits_cache(self, n: int, upto: int) -> bool:
        x = next(iter(make_loader(self.holdout, 1, train=False, device=self.device)))[0]
        per_sample = x.numel() + sum(f.numel() for f in self._teacher_features(x, upto))
        return n * per_sample * 4 <= self.hp.teacher_cache_mb * 2**20

    # -- super-net training ------------------------------------------------------------------------
    def _stage_batches(self, s: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(teacher input of stage s, teacher output of stage s, labels) for one epoch."""
        bs, seed = self.hp.batch_size, derive_seed(self.ctx.seed, "stage", s)
        if ("train", s) not in self._cache and self._fits_cache(len(self.search_train), s):
            ins, outs, labels = [], [], []
            for x, y in make_loader(self.search_train, self.hp.eval_batch_size, train=False, device=self.device):
                feats = [x, *self._teacher_features(x, s)]
                ins.append(feats[s])
                outs.append(feats[s + 1])
                labels.append(y)
            for key in [k for k in self._cache if k[0] == "train"]:  # one stage's features at a time
                del self._cache[key]
            self._cache[("train", s)] = (torch.cat(ins), torch.cat(outs), torch.cat(labels))
        if ("train", s) in self._cache:
            x_in, out, y = self._cache[("train", s)]
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
            order = order.to(self.device)
            n_batches = len(y) // bs if len(y) >= bs else 1
            for i in range(n_batches):
                idx = order[i * bs : (i + 1) * bs]
                yield x_in[idx], out[idx], y[idx]
            return
        loader = make_loader(self.search_train, bs, train=True, device=self.device, seed=seed)
        loader.set_epoch(epoch)
        for x, y in loader:
            feats = [x, *self._teacher_features(x, s)]
            yield feats[s], feats[s + 1], y

    def _steps_per_epoch(self) -> int:
        n, bs = len(self.search_train), self.hp.batch_size
        return max(1, n // bs)

    def _stage_config(self) -> TrainConfig:
        hp = self.hp
        return TrainConfig(epochs=hp.stage_epochs, batch_size=hp.batch_size, lr=hp.lr, weight_decay=hp.wd)

    def _stage_optimizer(self, s: int) -> torch.optim.Optimizer:
        return make_optimizer(nn.ModuleList(self.net.layout.modules[s]), self._stage_config())

    def _sandwich(self) -> list[tuple[str, Widths]]:
        randoms = [("random", self.space.widths(self.space.random(self.gen))) for _ in range(self.hp.n_random)]
        return [("full", self.space.full), ("tiny", self.space.tiny()), *randoms]

    def _batch_losses(
        self, s: int, x_in: torch.Tensor, target: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Sandwich forward/backward on one batch (gradients accumulate). Returns the summed
        objective (``loss``) and the mean loss of each config kind (``loss_full``, ...), as
        detached 0-d tensors on the device (no host sync per batch)."""
        layout, last = self.net.layout, s == len(self.net.layout.stages) - 1
        with torch.no_grad():
            teacher_logits = self.teacher_layout.head(target) if last else None
        ref: tuple[torch.Tensor, torch.Tensor | None] = (target, teacher_logits)
        losses: dict[str, torch.Tensor] = {"loss": x_in.new_zeros((), dtype=torch.float32)}
        for kind, widths in self._sandwich():
            self.net.set_widths(widths)
            mask = self.net.input_mask(s, widths, x_in.device)
            with autocast(self.device):
                out = layout.stages[s](x_in if mask is None else x_in * mask)
                feat_t, logits_t = (
                    (target, teacher_logits) if kind == "full" or self.hp.teacher_mode == "external" else ref
                )
                group = layout.boundary[s]
                kept_out, kept_t = (self.net.kept(f, group, widths[group]) for f in (out, feat_t))
                loss = F.mse_loss(kept_out.float(), kept_t.float())
                logits = layout.head(out).float() if last else None
                if last:
                    assert logits is not None and logits_t is not None  # the last stage ran both heads
                    loss = loss + (F.cross_entropy(logits, y) if kind == "full" else _kl(logits, logits_t))
            loss.backward()
            if kind == "full":
                ref = (out.detach(), None if logits is None else logits.detach())
            value = loss.detach()
            losses["loss"] = losses["loss"] + value
            losses[f"loss_{kind}"] = losses.get(f"loss_{kind}", 0.0) + value / (
                self.hp.n_random if kind == "random" else 1
            )
        self.net.set_widths(None)
        return losses

    def _train_epoch(self, s: int, epoch: int) -> dict[str, float]:
        if epoch == 0 or self._optimizer is None:
            self._optimizer = self._stage_optimizer(s)
        cfg, spe = self._stage_config(), self._steps_per_epoch()
        self.net.model.train()
        totals: dict[str, torch.Tensor] = {}
        n = 0
        # Dropout (MobileNet heads) draws from the global RNG: fork it, seeded by (seed, stage, epoch).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(self.ctx.seed, "dropout", s, epoch))
            for i, (x_in, target, y) in enumerate(self._stage_batches(s, epoch)):
                lr = cfg.lr * lr_factor(epoch * spe + i, cfg, spe)
                for group in self._optimizer.param_groups:
                    group["lr"] = lr
                self._optimizer.zero_grad(set_to_none=True)
                for key, value in self._batch_losses(s, x_in, target, y).items():
                    totals[key] = totals.get(key, 0.0) + value
                self._optimizer.step()
                n += 1
        if epoch == self.hp.stage_epochs - 1:
            self._optimizer = None  # the next stage gets a fresh optimizer
        out = {"stage": s, "epoch": epoch, "lr": lr, **{key: float(v) / n for key, v in totals.items()}}
        if not all(math.isfinite(v) for v in out.values()):
            raise FloatingPointError(f"sp: stage {s} training diverged in epoch {epoch} ({out}); lower lr")
        return out

    # -- proxy evaluation --------------------------------------------------------------------------
    def _holdout_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        """Holdout (images, labels, teacher stage outputs), cached when they fit."""
        if "holdout" in self._cache:
            return self._cache["holdout"]
        last = len(self.net.layout.stages) - 1
        loader = make_loader(self.holdout, self.hp.eval_batch_size, train=False, device=self.device)
        batches: Iterable[Any] = ((x, y, self._teacher_features(x, last)) for x, y in loader)
        if self._fits_cache(len(self.holdout), last):
            batches = self._cache["holdout"] = list(batches)
        return batches

    @torch.no_grad()
    def evaluate_widths(self, widths: Widths) -> dict[str, float]:
        """The proxies of a subnet: holdout top-1 of the chained subnet after BN recalibration
        (``val_top1``), and the summed stage losses against the teacher (``proxy_loss``).
        The super-net's BN statistics are restored afterwards."""
        model = self.net.model
        bns = bn_layers(model)
        saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
        self.net.set_widths(widths)
        try:
            recalibrate_bn(
                model,
                recalibration_batches(
                    self.search_train,
                    self.hp.recalib_images,
                    self.hp.eval_batch_size,
                    device=self.device,
                    seed=derive_seed(self.ctx.seed, "recalib"),
                ),
            )
            correct, loss, n = 0, 0.0, 0
            for x, y, feats in self._holdout_batches():
                correct += int((model(x).argmax(1) == y).sum())
                loss += self._stage_loss_sum(x, feats, widths) * len(y)
                n += len(y)
        finally:
            self.net.set_widths(None)
            for m, state in zip(bns, saved, strict=True):
                m.load_state_dict(state)
        return {"val_top1": correct / n, "proxy_loss": loss / n}

    def _stage_loss_sum(self, x: torch.Tensor, feats: list[torch.Tensor], widths: Widths) -> float:
        layout, total = self.net.layout, 0.0
        inputs = [x, *feats[:-1]]
        for s, stage in enumerate(layout.stages):
            mask = self.net.input_mask(s, widths, x.device)
            out = stage(inputs[s] if mask is None else inputs[s] * mask)
            group = layout.boundary[s]
            kept_out, kept_t = (self.net.kept(f, group, widths[group]) for f in (out, feats[s]))
            total += float(F.mse_loss(kept_out, kept_t))
        total += float(_kl(layout.head(out), self.teacher_layout.head(feats[-1])))
        return total

    # -- evolution -----------------------------------------------------------------------------------
    def _ranked(self) -> list[dict[str, Any]]:
        return sorted(self.evaluated.values(), key=lambda e: (-e["val_top1"], e["proxy_loss"], e["key"]))

    def _novel(self, genes: Genes, taken: set[tuple[int, ...]]) -> bool:
        key = self.space.key(genes)
        return key not in self.evaluated and key not in taken and self.space.in_window(genes)

    def _children(
        self, n: int, make: Callable[[], Genes], taken: set[tuple[int, ...]], origin: str, out: list[tuple[Genes, str]]
    ) -> None:
        """Up to ``n`` novel in-window children from ``make`` (at most 10n tries, as SPOS)."""
        made = 0
        for _ in range(10 * n):
            if made == n:
                return
            genes = make()
            if self._novel(genes, taken):
                taken.add(self.space.key(genes))
                out.append((genes, origin))
                made += 1

    def _next_population(self, generation: int) -> list[tuple[Genes, str]]:
        hp, space, gen = self.hp, self.space, self.gen
        out: list[tuple[Genes, str]] = []
        taken: set[tuple[int, ...]] = set()
        parents = [e["genes"] for e in self._ranked()[: hp.parents]]
        if generation > 0 and parents:
            self._children(
                hp.mutation_children,
                lambda: space.mutate(parents[_pick(len(parents), gen)], hp.mutation_prob, gen),
                taken,
                "mutation",
                out,
            )
            if len(parents) > 1:
                self._children(
                    hp.crossover_children,
                    lambda: space.crossover(parents[_pick(len(parents), gen)], parents[_pick(len(parents), gen)], gen),
                    taken,
                    "crossover",
                    out,
                )
        for _ in range(hp.population * hp.sample_retries):  # fill up with random candidates
            if len(out) >= hp.population:
                break
            genes = space.sample(gen, hp.sample_retries)  # raises when the window is unreachable
            if self._novel(genes, taken):
                taken.add(space.key(genes))
                out.append((genes, "random"))
        return out[: hp.population]

    def _record(self, entry: dict[str, Any]) -> SubnetRecord:
        spec = models.with_widths(self.ctx.spec, self.space.widths(entry["genes"]))
        return SubnetRecord.of(
            spec,
            {"val_top1": entry["val_top1"], "proxy_loss": entry["proxy_loss"]},
            self.name,
            entry["step"],
            self.ctx.input_size,
            generation=entry["generation"],
            origin=entry["origin"],
        )

    def _search_generation(self, generation: int) -> tuple[dict[str, float], list[SubnetRecord]]:
        records = []
        for genes, origin in self._next_population(generation):
            entry = {
                "genes": genes,
                "key": list(self.space.key(genes)),
                "generation": generation,
                "origin": origin,
                "step": self.steps_done,
                **self.evaluate_widths(self.space.widths(genes)),
            }
            self.evaluated[self.space.key(genes)] = entry
            records.append(self._record(entry))
        best = self._ranked()[0]
        metrics = {
            "generation": generation,
            "new_candidates": len(records),
            "evaluated": len(self.evaluated),
            "best_val_top1": best["val_top1"],
            "best_proxy_loss": best["proxy_loss"],
            "target_macs": self.target,
            "flops_window_low": self.hp.flops_window_low,
        }
        if records:
            metrics["mean_val_top1"] = sum(r.metrics["val_top1"] for r in records) / len(records)
        return metrics, records

    # -- the Method interface ------------------------------------------------------------------------
    @property
    def planned_steps(self) -> int:
        return len(self.plan)

    @property
    def done(self) -> bool:
        return self.steps_done >= len(self.plan)

    @property
    def trained(self) -> bool:
        """True once every stage super-net has been trained (the proxies are meaningful)."""
        return self.done or self.plan[self.steps_done][0] == "search"

    def step(self) -> StepResult:
        if self.done:
            raise RuntimeError("sp: the search is finished; call finalize()")
        phase, a, b = self.plan[self.steps_done]
        records: list[SubnetRecord] = []
        if phase == "pretrain":
            metrics = self._pretrain()
        elif phase == "train":
            metrics = self._train_epoch(a, b)
        else:
            metrics, records = self._search_generation(a)
        self.steps_done += 1
        if self.done and self.hp.rank_archs > 0:
            metrics.update(self._rank_check())
        return StepResult(
            step=self.steps_done - 1, metrics={k: float(v) for k, v in metrics.items()}, subnets=records, done=self.done
        )

    def _rank_check(self) -> dict[str, float]:
        """Kendall tau of the proxies against short real trainings (reported with the last step)."""
        cfg = (self.ctx.finetune or TrainConfig()).model_copy(update={"kd_weight": 0.0, "epochs": self.hp.rank_epochs})
        rank = proxy_rank_correlation(self, self.hp.rank_archs, cfg, seed=derive_seed(self.ctx.seed, "rank"))
        return {
            "kendall_tau": rank["kendall_tau"],
            "kendall_tau_loss": rank["kendall_tau_loss"],
            "rank_archs": rank["n_archs"],
        }

    def best(self) -> SubnetRecord:
        """The candidate with the best proxy top-1 (ties: lower proxy loss). Before the search
        has evaluated anything: the uniform-width subnet that meets the target (no metrics)."""
        if self.evaluated:
            return self._record(self._ranked()[0])
        ctx = self.ctx
        _, _, widths = fit_multiplier(
            ctx.spec, self.space.full, ctx.budget.min_widths(ctx.spec), self.target, ctx.input_size
        )
        return SubnetRecord.of(
            models.with_widths(ctx.spec, widths), {}, self.name, self.steps_done, ctx.input_size, fallback="uniform"
        )

    def state_dict(self) -> dict[str, Any]:
        own_teacher = self.teacher if self.ctx.teacher is None else None
        return {
            "hparams": self.hp.model_dump(mode="json"),
            "steps_done": self.steps_done,
            "supernet": self.net.model.state_dict(),
            "teacher": None if own_teacher is None else own_teacher.state_dict(),
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "rng": self.gen.get_state(),
            "evaluated": list(self.evaluated.values()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["hparams"] != self.hp.model_dump(mode="json"):
            raise InputError("sp: this state was written with different hyperparameters; resume with the same ones")
        self.steps_done = int(state["steps_done"])
        if state["teacher"] is not None:
            self._set_teacher(state["teacher"], init_supernet=False)
        self.net.model.load_state_dict(state["supernet"])
        self._optimizer = None
        if state["optimizer"] is not None:
            self._optimizer = self._stage_optimizer(self.plan[self.steps_done][1])
            # deepcopy: SGD would otherwise adopt (and later mutate) the caller's momentum tensors
            self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.gen.set_state(state["rng"])
        self.evaluated = {tuple(e["key"]): copy.deepcopy(e) for e in state["evaluated"]}
        self._cache.clear()


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), batch mean, T = 1."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), 1),
        F.log_softmax(teacher_logits.float(), 1),
        reduction="batchmean",
        log_target=True,
    )


# --------------------------------------------------------------------------------------------
# Proxy quality
# --------------------------------------------------------------------------------------------


def proxy_rank_correlation(
    method: SP, n_archs: int = 5, train_cfg: TrainConfig | None = None, seed: int = 0
) -> dict[str, Any]:
    """Kendall tau between SP's proxies and real accuracy on ``n_archs`` random in-window archs.

    Each arch is scored by :meth:`SP.evaluate_widths` and, separately, trained from scratch on
    the method's search-train split with ``train_cfg`` (default: the run's fine-tune recipe
    without KD) and evaluated on the same holdout. Returns ``kendall_tau`` (proxy top-1 vs real
    top-1), ``kendall_tau_loss`` (minus proxy loss vs real top-1) and the per-arch numbers.
    """
    if not method.trained:
        raise ValueError("proxy_rank_correlation: train the stage super-nets first (step() until the search phase)")
    ctx, gen = method.ctx, torch.Generator().manual_seed(seed)
    cfg = train_cfg or (ctx.finetune or TrainConfig()).model_copy(update={"kd_weight": 0.0})
    archs: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    for _ in range(n_archs * method.hp.sample_retries):
        if len(archs) == n_archs:
            break
        genes = method.space.sample(gen, method.hp.sample_retries)
        if method.space.key(genes) in seen:
            continue
        seen.add(method.space.key(genes))
        widths = method.space.widths(genes)
        spec = models.with_widths(ctx.spec, widths)
        net_seed = derive_seed(seed, "arch", len(archs))
        net = models.build(spec, seed=net_seed).to(method.device)
        fit(net, method.search_train, cfg, device=method.device, seed=net_seed, progress=method.ctx.progress)
        real = evaluate(net, method.holdout, device=method.device, batch_size=cfg.eval_batch_size)["top1"]
        archs.append(
            {
                "widths": widths,
                "macs": models.macs(spec, ctx.input_size),
                "real_top1": real,
                **method.evaluate_widths(widths),
            }
        )
    if len(archs) < 2:
        raise SearchError(f"proxy_rank_correlation: found only {len(archs)} distinct in-window archs")
    real_top1s = [a["real_top1"] for a in archs]
    return {
        "kendall_tau": kendall_tau_b([a["val_top1"] for a in archs], real_top1s),
        "kendall_tau_loss": kendall_tau_b([-a["proxy_loss"] for a in archs], real_top1s),
        "n_archs": len(archs),
        "archs": archs,
    }
