"""TAS: Network Pruning via Transformable Architecture Search (Dong & Yang, NeurIPS 2019).

A search super-net gives every conv of a ResNet (``cifar_resnet`` or the ImageNet ``resnet``
family) a categorical distribution over candidate widths (``int(C * r)`` for r in 0.3..1.0) and
every stage one over candidate depths. Each forward samples a Gumbel-softmax, mixes the top-2
sampled widths per conv (prefix slices of one shared filter bank, one BN per candidate width,
channel-wise interpolation to align them) and mixes the candidate stage ends. Weights are
trained on one half of the training set, the architecture logits on the other with cross-entropy
plus a FLOPs cost loss on a differentiable expected-MACs relaxation. The argmax of the logits
("genotype") is the pruned network; it is trained from scratch with KD from the unpruned teacher
(the shared :meth:`Method.finalize`).

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

Expected result (paper, 600 search + 300 training epochs): ResNet-56 / CIFAR-10 at 47% of the
MACs reaches 93.69% top-1 (5.95E7 MACs).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from .. import models
from ..engine.data import Dataset, make_loader, split_per_class
from ..engine.train import (TrainConfig, autocast, evaluate, make_optimizer, make_scheduler, recalibrate_bn,
                            recalibration_batches)
from ..engine.utils import derive_seed
from ..models import cifar_resnet, resnet
from ..models.base import Layer, Spec, SpecError, spec_hash
from ..models.cifar_resnet import init_weights
from . import register
from .base import Method, MethodHparams, RunContext, StepResult, SubnetRecord, within_budget

__all__ = ["GEOMETRIES", "WIDTH_RATIOS", "Geometry", "SearchResNet", "TAS", "TASHparams", "channel_interp",
           "cost_loss", "depth_candidates", "imagenet_depth_candidates", "tau_at", "width_candidates",
           "zero_pad_add"]

WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# --------------------------------------------------------------------------------------------
# Search space, schedules and the cost loss
# --------------------------------------------------------------------------------------------


def width_candidates(channels: int, ratios: Sequence[float] = WIDTH_RATIOS, min_width: int = 1) -> tuple[int, ...]:
    """``sorted(set(int(C * r)))`` (Python truncation, as TAS), without widths below ``min_width``.

    Falls back to ``(C,)`` when every candidate is below ``min_width``.
    """
    kept = sorted({int(channels * r) for r in ratios if int(channels * r) >= max(1, min_width)})
    return tuple(kept) or (channels,)


def depth_candidates(blocks: int) -> tuple[int, ...]:
    """CIFAR TAS stage depths: n<=3 -> 1..n; else the odd counts 1,3,5,... plus n if n is even."""
    if blocks < 1:
        raise ValueError(f"a stage needs at least one block, got {blocks}")
    if blocks <= 3:
        return tuple(range(1, blocks + 1))
    odd = list(range(1, blocks + 1, 2))
    return tuple(odd if odd[-1] == blocks else [*odd, blocks])


def imagenet_depth_candidates(layers: Sequence[int]) -> list[tuple[int, ...]]:
    """ImageNet TAS stage depths: with m = min(layers), stage i gets ``int(layers[i] * j / m)``, j=1..m."""
    m = min(layers)
    return [tuple(n * j // m for j in range(1, m + 1)) for n in layers]


def tau_at(epoch: int, epochs: int, tau_max: float = 5.0, tau_min: float = 0.1,
           schedule: Literal["cosine", "linear"] = "cosine") -> float:
    """Gumbel temperature for 0-based ``epoch`` of ``epochs`` (set once per epoch, as TAS).

    cosine (reference code): ``tau_min + (tau_max - tau_min) * (1 + cos(pi * e / E)) / 2``;
    linear (paper, there with tau_max=10): ``tau_max - (tau_max - tau_min) * e / E``.
    """
    ratio = epoch / max(1, epochs)
    if schedule == "cosine":
        return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * ratio)) / 2
    return tau_max - (tau_max - tau_min) * ratio


def cost_loss(expected_macs: torch.Tensor, current_macs: int, target_macs: float, max_macs: int,
              tolerance: float = 0.05, mode: Literal["code", "paper"] = "code") -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------------------------

_CWI_CACHE: dict[tuple[int, int, str, torch.dtype], torch.Tensor] = {}


def _cwi_weight(c_in: int, c_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The [c_out, c_in, 1, 1] averaging matrix of 1-D adaptive average pooling along channels."""
    key = (c_in, c_out, str(device), dtype)
    if key not in _CWI_CACHE:
        m = torch.zeros(c_out, c_in, dtype=torch.float64)
        for i in range(c_out):
            lo, hi = (i * c_in) // c_out, -(-((i + 1) * c_in) // c_out)  # floor, ceil: adaptive pool bins
            m[i, lo:hi] = 1.0 / (hi - lo)
        _CWI_CACHE[key] = m.to(device=device, dtype=dtype)[:, :, None, None]
    return _CWI_CACHE[key]


def channel_interp(x: torch.Tensor, channels: int) -> torch.Tensor:
    """TAS's channel-wise interpolation v2: adaptive average pooling over (C, H, W) to
    ``(channels, H, W)``, i.e. area interpolation along the channel axis.

    Computed as a fixed 1x1 conv (same values as ``adaptive_avg_pool3d``, faster, channels_last friendly).
    """
    if x.shape[1] == channels:
        return x
    return F.conv2d(x, _cwi_weight(x.shape[1], channels, x.device, x.dtype))


def zero_pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Residual add of unequal widths: the narrower tensor is added onto the wider one's first channels."""
    if a.shape[1] == b.shape[1]:
        return a + b
    wide, narrow = (a, b) if a.shape[1] > b.shape[1] else (b, a)
    c = narrow.shape[1]
    return torch.cat([wide[:, :c] + narrow, wide[:, c:]], dim=1)


def _gumbel(shape: torch.Size, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU from the method's private generator: identical on every device, and the
    # clamp replaces TAS's "redraw on inf" loop.
    e = torch.empty(shape).exponential_(generator=gen).clamp_min_(1e-20)
    return (-e.log()).to(device)


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, float("-inf")).log_softmax(dim=1)


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
# Family geometry: the only family-specific part of the super-net
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockPlan:
    """One residual block of the super-net, by the layer names of the family's analytic walk."""

    stage: int
    convs: tuple[str, ...]  # the block's convs in forward order
    shortcut: str | None = None  # the shortcut conv (None: identity)
    shortcut_pool: bool = False  # AvgPool2d(2) before the shortcut conv (TAS's CIFAR stride-2 shortcut)
    shortcut_bn: bool = True  # per-candidate BNs after the shortcut conv


class Geometry(abc.ABC):
    """How the super-net reads one family's spec: stem, block walk, shortcuts, depth candidates.

    Everything else (shapes, MACs) comes from the family's own analytic walk of :meth:`search_spec`,
    so the super-net and every genotype agree by construction. Genotypes are specs of the same
    family with the super-net's search spec fields (and new stem/stages).
    """

    family: ClassVar[str]
    stem: ClassVar[str]  # the stem conv's layer name
    stem_pool: ClassVar[bool] = False  # a 3x3 stride-2 max-pool after the stem's ReLU

    def search_spec(self, spec: Spec) -> Spec:
        """The spec the super-net mirrors (and every genotype inherits the fields of)."""
        return dict(spec)

    @abc.abstractmethod
    def blocks(self, spec: Spec) -> Iterator[BlockPlan]:
        """The residual blocks in forward order."""

    @abc.abstractmethod
    def depth_rows(self, blocks_per_stage: list[int]) -> list[tuple[int, ...]]:
        """Per stage, the candidate numbers of kept blocks (a stage keeps its first ``d`` blocks)."""


class CifarGeometry(Geometry):
    """``cifar_resnet``: 3x3 stem; TAS's AvgPool(2) + 1x1 conv (no BN) stride-2 shortcut; CIFAR depths."""

    family, stem = "cifar_resnet", "stem.conv"

    def search_spec(self, spec: Spec) -> Spec:
        return {**spec, "shortcut": "avgpool_conv"}  # TAS's stride-2 shortcut, in search and genotype

    def blocks(self, spec: Spec) -> Iterator[BlockPlan]:
        for info in cifar_resnet.iter_blocks(spec):
            convs = tuple(f"{info.prefix}.conv{j + 1}" for j in range(len(info.widths)))
            if info.shortcut == "identity":
                yield BlockPlan(info.stage, convs)
            else:  # avgpool_conv (stride 2) or conv_bn_s1 (only where the unpruned net has one)
                pooled = info.shortcut == "avgpool_conv"
                yield BlockPlan(info.stage, convs, f"{info.prefix}.shortcut.conv", pooled, not pooled)

    def depth_rows(self, blocks_per_stage: list[int]) -> list[tuple[int, ...]]:
        return [depth_candidates(n) for n in blocks_per_stage]


class ImagenetGeometry(Geometry):
    """``resnet``: 7x7 stride-2 stem + max-pool; torchvision's 1x1 conv + BN downsample; ImageNet depths."""

    family, stem, stem_pool = "resnet", "conv1", True

    def blocks(self, spec: Spec) -> Iterator[BlockPlan]:
        for info in resnet.iter_blocks(spec):
            convs = tuple(f"{info.prefix}.conv{j + 1}" for j in range(len(info.widths)))
            yield BlockPlan(info.stage, convs, f"{info.prefix}.downsample.0" if info.downsample else None)

    def depth_rows(self, blocks_per_stage: list[int]) -> list[tuple[int, ...]]:
        return imagenet_depth_candidates(blocks_per_stage)


GEOMETRIES: dict[str, Geometry] = {g.family: g for g in (CifarGeometry(), ImagenetGeometry())}


# --------------------------------------------------------------------------------------------
# The search super-net
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """What one forward computes: per width row the candidate indices to mix and their weights
    (``weights`` None: a single fixed pick); per stage either depth-mixture weights over its
    candidates (search) or a fixed number of blocks."""

    picks: list[list[int]]
    weights: torch.Tensor | None = None
    depth_weights: torch.Tensor | None = None
    depths: list[int] | None = None

    def row(self, r: int) -> tuple[list[int], torch.Tensor | None]:
        return self.picks[r], None if self.weights is None else self.weights[r]


class SearchConv(nn.Module):
    """A conv searched over candidate output widths (prefix slices of one filter bank).

    Args:
        layer: the conv's analytic entry from the family walk (channels, kernel, stride, output size).
        row: its row in the width logits (a shortcut conv shares its block's last conv row).
        candidates: candidate output widths, ascending.
        bn: one BatchNorm per candidate width (False for TAS's stride-2 shortcut conv).
        relu: ReLU after the mixture.
        pool: AvgPool2d(2) before the conv (the stride-2 shortcut).
    """

    def __init__(self, layer: Layer, row: int, candidates: tuple[int, ...], *, bn: bool = True,
                 relu: bool = False, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride,
                              layer.kernel // 2, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in candidates) if bn else None
        self.pool = nn.AvgPool2d(2) if pool else None
        self.row, self.candidates, self.relu = row, candidates, relu
        self.macs_per_channel_pair = layer.kernel**2 * layer.out_hw[0] * layer.out_hw[1]
        self.name = layer.name  # the layer name in the family's walk (and in every genotype)

    def forward(self, x: torch.Tensor, picks: list[int], weights: torch.Tensor | None) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        widths = [self.candidates[i] for i in picks]
        top = max(widths)
        # Input channels beyond the incoming width would multiply zero padding: slice them off.
        y = F.conv2d(x, self.conv.weight[:top, : x.shape[1]], None, self.conv.stride, self.conv.padding)
        outs = [y[:, :c] if self.bns is None else self.bns[i](y[:, :c]) for i, c in zip(picks, widths)]
        if len(outs) == 1:
            out = outs[0]
        else:
            out = sum(w * channel_interp(o, top) for w, o in zip(weights, outs))
        return F.relu(out) if self.relu else out


class SearchBlock(nn.Module):
    """A post-activation residual block of search convs; relu(zero_pad_add(convs(x), shortcut(x)))."""

    def __init__(self, convs: list[SearchConv], shortcut: SearchConv | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor, sample: Sample) -> torch.Tensor:
        y = x
        for conv in self.convs:
            y = conv(y, *sample.row(conv.row))
        s = x if self.shortcut is None else self.shortcut(x, *sample.row(self.shortcut.row))
        return F.relu(zero_pad_add(y, s))  # the 2020 fix: ReLU after the add in search mode too

    def expected_macs(self, e_in: torch.Tensor, e_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected MACs, expected output width) given expected widths ``e_out`` per row."""
        macs, e = e_in.new_zeros(()), e_in
        for conv in self.convs:
            macs = macs + conv.macs_per_channel_pair * e * e_out[conv.row]
            e = e_out[conv.row]
        if self.shortcut is not None:
            macs = macs + self.shortcut.macs_per_channel_pair * e_in * e_out[self.shortcut.row]
        return macs, e


def _padded_table(rows: list[tuple[int, ...]]) -> torch.Tensor:
    table = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        table[i, : len(r)] = torch.tensor(r)
    return table


class SearchResNet(nn.Module):
    """TAS's width-and-depth search super-net for a ``cifar_resnet`` or ``resnet`` spec (basic or
    bottleneck blocks).

    Geometry comes from the family's analytic walk of the spec (through its :class:`Geometry`:
    ``cifar_resnet`` with ``avgpool_conv`` shortcuts, ``resnet`` with torchvision's downsample),
    so the super-net and every genotype agree on shapes and MACs by construction.

    Args:
        spec: the unpruned spec (its widths are the candidates' maxima).
        input_size: image size (family default if None); sets the spatial sizes of expected MACs.
        ratios: width ratios of the candidates.
        max_stage_prune: per stage, the maximum pruning rate; width candidates below
            ``ceil(C * (1 - rate))`` are removed. None: unconstrained.
        search_width, search_depth: False fixes widths (TAS (D)) or depths (TAS (W)) to the spec's.
        num_sampled: candidates mixed per conv (TAS's I = 2).
    """

    def __init__(self, spec: Spec, input_size: int | None = None, ratios: Sequence[float] = WIDTH_RATIOS,
                 max_stage_prune: Sequence[float] | None = None, search_width: bool = True,
                 search_depth: bool = True, num_sampled: int = 2) -> None:
        super().__init__()
        geometry = GEOMETRIES.get(spec.get("family"))
        if geometry is None:
            raise SpecError(f"tas: the search super-net supports {' and '.join(map(repr, GEOMETRIES))} specs, "
                            f"got family {spec.get('family')!r}; use e.g. --model cifar_resnet:56 or resnet:50")
        if max_stage_prune is not None and len(max_stage_prune) < len(spec["stages"]):
            raise SpecError(f"tas: max_stage_prune has {len(max_stage_prune)} rates but the model has "
                            f"{len(spec['stages'])} stages; give one rate per stage")
        self.spec = geometry.search_spec(spec)
        self.input_size = models.input_size_of(self.spec, input_size)
        self.num_sampled = num_sampled
        convs = {l.name: l for l in models.layers(self.spec, self.input_size) if l.kind == "conv"}
        rows: list[tuple[int, ...]] = []

        def new_conv(name: str, stage: int, **kw: Any) -> SearchConv:
            layer = convs[name]
            rate = 0.0 if max_stage_prune is None else max_stage_prune[stage]
            floor = math.ceil(layer.out_channels * (1.0 - rate) - 1e-9) if max_stage_prune is not None else 1
            rows.append(width_candidates(layer.out_channels, ratios if search_width else (1.0,), floor))
            return SearchConv(layer, len(rows) - 1, rows[-1], **kw)

        self.stem = new_conv(geometry.stem, 0, relu=True)
        self.stem_pool = geometry.stem_pool
        stages: list[list[SearchBlock]] = [[] for _ in self.spec["stages"]]
        for plan in geometry.blocks(self.spec):
            n = len(plan.convs)
            block_convs = [new_conv(name, plan.stage, relu=j < n - 1) for j, name in enumerate(plan.convs)]
            shortcut = None
            if plan.shortcut is not None:  # its output width follows the block's last conv (same row)
                last = block_convs[-1]
                shortcut = SearchConv(convs[plan.shortcut], last.row, last.candidates, bn=plan.shortcut_bn,
                                      pool=plan.shortcut_pool)
            stages[plan.stage].append(SearchBlock(block_convs, shortcut))
        self.stages = nn.ModuleList(nn.ModuleList(s) for s in stages)
        self.fc = nn.Linear(self.spec["stages"][-1][-1][-1], self.spec["num_classes"])
        init_weights(self)
        lengths = [len(s) for s in stages]
        self._init_arch(rows, geometry.depth_rows(lengths) if search_depth else [(n,) for n in lengths])

    def _init_arch(self, rows: list[tuple[int, ...]], depths: list[tuple[int, ...]]) -> None:
        self.width_rows, self.depth_rows = rows, depths
        self.register_buffer("width_table", _padded_table(rows))
        self.register_buffer("width_mask", self.width_table > 0)
        self.register_buffer("depth_table", _padded_table(depths))
        self.register_buffer("depth_mask", self.depth_table > 0)
        self.width_logits = nn.Parameter(0.01 * torch.randn(self.width_table.shape))
        self.depth_logits = nn.Parameter(0.01 * torch.randn(self.depth_table.shape))

    # -- parameters ----------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.width_logits, self.depth_logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, tau: float, gen: torch.Generator) -> Sample:
        """Gumbel-softmax with temperature ``tau``; top-``num_sampled`` candidates per conv.

        Drawing without replacement from ``softmax(z)`` is done with the Gumbel-top-k trick (the
        same distribution as TAS's ``multinomial``), which never picks a masked candidate while
        a valid one is left; picks of masked candidates (rows with fewer valid ones) are dropped.
        """
        dev = self.width_logits.device
        z = (_masked_log_softmax(self.width_logits, self.width_mask) + _gumbel(self.width_logits.shape, gen, dev)) / tau
        k = min(self.num_sampled, z.shape[1])
        order = (z.detach() + _gumbel(z.shape, gen, dev)).topk(k, dim=1).indices
        weights = z.gather(1, order).softmax(dim=1)
        valid = self.width_mask.gather(1, order)
        picks = [[i for i, v in zip(o, m) if v] for o, m in zip(order.tolist(), valid.tolist())]
        zd = _masked_log_softmax(self.depth_logits, self.depth_mask) + _gumbel(self.depth_logits.shape, gen, dev)
        return Sample(picks, weights, depth_weights=(zd / tau).softmax(dim=1))

    def argmax_indices(self) -> tuple[list[int], list[int]]:
        """(candidate index per width row, candidate index per stage) of the largest logit."""
        w = self.width_logits.detach().masked_fill(~self.width_mask, float("-inf")).argmax(dim=1)
        d = self.depth_logits.detach().masked_fill(~self.depth_mask, float("-inf")).argmax(dim=1)
        return w.tolist(), d.tolist()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sample: Sample) -> torch.Tensor:
        x = self.stem(x, *sample.row(self.stem.row))
        if self.stem_pool:
            x = F.max_pool2d(x, 3, 2, 1)
        for s, stage in enumerate(self.stages):
            if sample.depths is not None:
                for block in stage[: sample.depths[s]]:
                    x = block(x, sample)
            else:
                x = self._mixed_stage(x, s, stage, sample)
        features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        # The classifier reads only the first C input columns (C = incoming width).
        return F.linear(features, self.fc.weight[:, : features.shape[1]], self.fc.bias)

    def _mixed_stage(self, x: torch.Tensor, s: int, stage: nn.ModuleList, sample: Sample) -> torch.Tensor:
        ends = set(self.depth_rows[s])
        candidates = []
        for b, block in enumerate(stage):  # every block runs; candidate stage ends are mixed
            x = block(x, sample)
            if b + 1 in ends:
                candidates.append(x)
        if len(candidates) == 1:
            return candidates[0]
        top = max(t.shape[1] for t in candidates)
        return sum(w * channel_interp(t, top) for w, t in zip(sample.depth_weights[s], candidates))

    # -- expected MACs -------------------------------------------------------------------------
    def expected_macs(self) -> torch.Tensor:
        """TAS's differentiable FLOPs relaxation (float64 MACs; the paper's cost loss): no Gumbel noise; E[C] per
        conv chained through the net; each block weighted by P(kept) = reverse cumulative sum of
        its stage's depth probabilities; stride-2 shortcut and FC terms included."""
        p = self.width_logits.double().masked_fill(~self.width_mask, float("-inf")).softmax(dim=1)
        e_out = (p * self.width_table).sum(dim=1)
        q = self.depth_logits.double().masked_fill(~self.depth_mask, float("-inf")).softmax(dim=1)
        keep = q.flip(1).cumsum(1).flip(1)  # keep[s, i] = P(depth index >= i)
        e_in = e_out.new_tensor(3.0)
        total = self.stem.macs_per_channel_pair * e_in * e_out[self.stem.row]
        e_in = e_out[self.stem.row]
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                ends_before = sum(1 for d in self.depth_rows[s] if d <= b)  # candidate ends strictly before b
                macs, e_in = block.expected_macs(e_in, e_out)
                total = total + keep[s, ends_before] * macs
        return total + e_in * self.fc.out_features

    # -- genotypes -----------------------------------------------------------------------------
    def genotype(self, width_idx: Sequence[int] | None = None, depth_idx: Sequence[int] | None = None) -> Spec:
        """The spec (the super-net's family) of chosen candidates (default: the argmax).

        Blocks after a stage's chosen depth are dropped; since a block's input width in the spec
        is the previous block's output, the next stage starts from the last kept block.
        """
        if width_idx is None or depth_idx is None:
            width_idx, depth_idx = self.argmax_indices()
        w = [self.width_rows[r][i] for r, i in enumerate(width_idx)]
        stages = [[[w[c.row] for c in block.convs] for block in stage[: self.depth_rows[s][depth_idx[s]]]]
                  for s, stage in enumerate(self.stages)]
        return {**self.spec, "stem": w[self.stem.row], "stages": stages}

    def conv_slots(self, spec: Spec) -> list[tuple[Slot, str, int]]:
        """For each conv width of a genotype ``spec``: (slot, layer name, super-net width row)."""
        slots: list[tuple[Slot, str, int]] = [(None, self.stem.name, self.stem.row)]
        for s, stage in enumerate(spec["stages"]):
            for b, widths in enumerate(stage):
                for j in range(len(widths)):
                    conv = self.stages[s][b].convs[j]  # block b of a genotype's stage is block b here
                    slots.append(((s, b, j), conv.name, conv.row))
        return slots

    def fixed_sample(self, spec: Spec) -> Sample | None:
        """The single-path sample that computes genotype ``spec`` with the super-net's weights,
        or None if a width of ``spec`` is not a candidate (it has no BN in the super-net)."""
        picks = [[len(row) - 1] for row in self.width_rows]  # rows of dropped blocks are never read
        for slot, _, row in self.conv_slots(spec):
            width = slot_width(spec, slot)
            if width not in self.width_rows[row]:
                return None
            picks[row] = [self.width_rows[row].index(width)]
        return Sample(picks, depths=[len(stage) for stage in spec["stages"]])

    def discrepancy(self) -> float:
        """Mean over searched rows of (top-1 minus top-2 probability): TAS's convergence diagnostic."""
        gaps = []
        for logits, mask in ((self.width_logits, self.width_mask), (self.depth_logits, self.depth_mask)):
            rows = mask.sum(dim=1) >= 2
            if rows.any():
                p = logits.detach()[rows].masked_fill(~mask[rows], float("-inf")).softmax(dim=1)
                top = p.topk(2, dim=1).values
                gaps.append(top[:, 0] - top[:, 1])
        return float(torch.cat(gaps).mean()) if gaps else 1.0


Slot = tuple[int, int, int] | None  # (stage, block, conv) in a spec's "stages"; None = the stem


def slot_width(spec: Spec, slot: Slot) -> int:
    return spec["stem"] if slot is None else spec["stages"][slot[0]][slot[1]][slot[2]]


def _set_slot(spec: Spec, slot: Slot, width: int) -> None:
    if slot is None:
        spec["stem"] = width
    else:
        spec["stages"][slot[0]][slot[1]][slot[2]] = width


def shrink_to_budget(net: SearchResNet, spec: Spec, floors: Sequence[int], target_macs: int,
                     input_size: int | None = None) -> Spec:
    """Shrink a genotype until ``macs <= target_macs`` (the budget fallback of :meth:`TAS.best`).

    Each round steps the conv with the most MACs among those that can still shrink one notch
    down its candidate list, then to its ``floors`` width (the budget's per-stage limit); when
    no width can shrink, drops the last block of the deepest stage.

    Raises:
        SpecError: nothing is left to shrink and the genotype is still over the target.
    """
    spec = copy.deepcopy(spec)
    while models.macs(spec, input_size) > target_macs:
        layer_macs = {layer.name: layer.macs for layer in models.layers(spec, input_size)}
        options = []
        for slot, name, row in net.conv_slots(spec):
            width = slot_width(spec, slot)
            lower = [c for c in (*net.width_rows[row], floors[row]) if floors[row] <= c < width]
            if lower:
                options.append((layer_macs[name], max(lower), slot))
        if options:
            _, width, slot = max(options, key=lambda o: o[0])  # first of equals: deterministic
            _set_slot(spec, slot, width)
            continue
        deepest = max(range(len(spec["stages"])), key=lambda s: len(spec["stages"][s]))
        if len(spec["stages"][deepest]) == 1:
            raise SpecError(f"tas: no genotype fits {target_macs} MACs even at the narrowest widths and "
                            "one block per stage; raise flops_target")
        spec["stages"][deepest].pop()
    return spec


WINDOW_LOW = 0.9  # the reported subnet should have at least this fraction of the target MACs


def grow_to_window(net: SearchResNet, spec: Spec, target_macs: int, low: float,
                   input_size: int | None = None) -> Spec:
    """Widen a genotype that settled below ``low`` MACs (the other end of :func:`shrink_to_budget`):
    each round steps one conv one notch up its candidate list, the one that adds the fewest MACs
    while the genotype stays within ``target_macs``, until it reaches ``low`` or no step fits."""
    spec = copy.deepcopy(spec)
    while models.macs(spec, input_size) < low:
        best: tuple[int, Spec] | None = None
        for slot, _, row in net.conv_slots(spec):
            width = slot_width(spec, slot)
            higher = [c for c in net.width_rows[row] if c > width]
            if not higher:
                continue
            trial = copy.deepcopy(spec)
            _set_slot(trial, slot, min(higher))
            macs = models.macs(trial, input_size)
            if macs <= target_macs and (best is None or macs < best[0]):
                best = (macs, trial)
        if best is None:
            break
        spec = best[1]
    return spec


class _FixedPath(nn.Module):
    """``net(x)`` for :func:`evaluate`: the super-net restricted to one genotype."""

    def __init__(self, net: SearchResNet, sample: Sample) -> None:
        super().__init__()
        self.net, self.sample = net, sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.sample)


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
    def _check(self) -> "TASHparams":
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be <= tau_max ({self.tau_max})")
        if not self.width_ratios or not all(0 < r <= 1 for r in self.width_ratios):
            raise ValueError(f"width_ratios must be non-empty fractions in (0, 1], got {self.width_ratios}")
        return self


@register("tas")
class TAS(Method):
    """Transformable architecture search over per-conv widths and per-stage depths.

    One :meth:`step` is one search epoch. Every distinct epoch-end genotype is reported once as a
    :class:`SubnetRecord` (``val_top1`` = its single-path search-val accuracy). :meth:`best`:
    with ``select="last"`` the last genotype if it meets the budget; otherwise (or with
    ``select="best"``) the in-budget genotype with the highest ``val_top1``, preferring those
    within ``flop_tolerance`` of the target; if none is in budget, the last genotype shrunk
    greedily until it fits. A choice below ``WINDOW_LOW`` (0.9) of the target MACs is widened
    into the window (:func:`grow_to_window`) and re-scored. The final net is trained from
    scratch (``initial_weights`` is None).
    """

    Hparams: ClassVar[type[MethodHparams]] = TASHparams
    smoke: ClassVar[dict] = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64}
    hp: TASHparams

    def __init__(self, ctx: RunContext, hparams: MethodHparams | dict[str, Any] | None = None) -> None:
        super().__init__(ctx, hparams)
        hp, self.device = self.hp, torch.device(ctx.device)
        rates = ctx.budget.max_stage_prune
        with torch.random.fork_rng(devices=[]):  # weight/arch init depends on the run seed only
            torch.manual_seed(derive_seed(ctx.seed, 0))
            self.net = SearchResNet(ctx.spec, ctx.input_size, hp.width_ratios, rates, hp.search_width,
                                    hp.search_depth, hp.num_sampled_widths).to(self.device)
        self.gen = torch.Generator().manual_seed(derive_seed(ctx.seed, 1))
        self.max_macs = models.macs(ctx.spec, ctx.input_size)
        self.target_macs = ctx.budget.target_macs(ctx.spec, ctx.input_size)
        self.search_train, self.search_val = self._split()
        self.train_loader = make_loader(self.search_train, hp.batch_size, train=True, device=self.device,
                                        seed=derive_seed(ctx.seed, 2))
        self.arch_loader = make_loader(self.search_val, hp.batch_size, train=True, device=self.device,
                                       seed=derive_seed(ctx.seed, 3))
        cfg = TrainConfig(epochs=hp.epochs, lr=hp.w_lr, momentum=hp.w_momentum, nesterov=hp.nesterov,
                          weight_decay=hp.w_wd, schedule="cosine")
        self.w_opt = make_optimizer(self.net.weight_parameters(), cfg)  # decay on all weights, as TAS
        self.w_sched = make_scheduler(self.w_opt, cfg, len(self.train_loader))
        self.a_opt = torch.optim.Adam(self.net.arch_parameters(), lr=hp.arch_lr, betas=hp.arch_betas,
                                      weight_decay=hp.arch_wd)
        self.seen: dict[str, SubnetRecord] = {}
        self.last_key = ""
        self._macs_cache: dict[str, int] = {}
        self._grown: dict[str, SubnetRecord] = {}  # below-window genotype key -> its widened record

    def _split(self) -> tuple[Dataset, Dataset]:
        labels = self.ctx.train.labels
        val_idx, train_idx = split_per_class(labels, self.hp.val_fraction, self.ctx.seed)
        if len(train_idx) == 0 or len(val_idx) == 0:
            raise ValueError(f"tas: val_fraction={self.hp.val_fraction} leaves an empty search half "
                             f"({len(labels)} training samples); use more data or a fraction nearer 0.5")
        return self.ctx.train.subset(train_idx), self.ctx.train.subset(val_idx)

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
        metrics.update(tau=tau, w_lr=self.w_opt.param_groups[0]["lr"], val_top1=record.metrics["val_top1"],
                       macs=float(record.macs), macs_ratio=record.macs / self.max_macs,
                       target_ratio=self.target_macs / self.max_macs, expected_macs=expected,
                       expected_ratio=expected / self.max_macs, discrepancy=self.net.discrepancy(),
                       in_budget=float(record.source["in_budget"]), params=float(record.params),
                       **{f"depth_{s}": float(len(st)) for s, st in enumerate(record.spec["stages"])})
        return StepResult(step=epoch, metrics=metrics, subnets=[record] if is_new else [], done=self.done)

    def _val_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The arch half is cycled as often as the weight half needs; each pass reseeded by (epoch, pass).
        for k in itertools.count():
            self.arch_loader.set_epoch(epoch * 1000 + k)
            yield from self.arch_loader

    def _search_epoch(self, epoch: int, tau: float) -> dict[str, float]:
        self.net.train()
        self.train_loader.set_epoch(epoch)
        sums = {k: torch.zeros((), device=self.device) for k in ("train_loss", "train_top1", "arch_ce",
                                                                 "cost_loss", "search_val_top1")}
        n = 0
        for (x, y), (xv, yv) in zip(self.train_loader, self._val_batches(epoch)):
            loss, hits = self._weight_step(x, y, tau)
            ce, cost, val_hits = self._arch_step(xv, yv, tau)
            for key, value in (("train_loss", loss), ("train_top1", hits), ("arch_ce", ce), ("cost_loss", cost),
                               ("search_val_top1", val_hits)):
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
            cost = cost_loss(self.net.expected_macs(), current, self.target_macs, self.max_macs,
                             hp.flop_tolerance, hp.tolerance_mode)
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
        path = _FixedPath(copy.deepcopy(self.net), sample)
        if self.hp.bn_recalibration_batches:
            self._recalibrate_bn(path)
        result = evaluate(path, self.search_val, device=self.device, batch_size=self.hp.eval_batch_size,
                          amp=self.hp.amp)
        return float(result["top1"])

    def _recalibrate_bn(self, path: nn.Module) -> None:
        hp = self.hp
        batches = recalibration_batches(self.search_train, hp.bn_recalibration_batches * hp.batch_size,
                                        hp.batch_size, device=self.device, seed=derive_seed(self.ctx.seed, "recalib"))
        with autocast(self.device, hp.amp):
            recalibrate_bn(path, batches)

    def _record(self, spec: Spec, val: float, step: int, **source: Any) -> SubnetRecord:
        ctx = self.ctx
        in_budget = within_budget(spec, ctx.spec, ctx.budget, ctx.input_size)
        return SubnetRecord.of(spec, {"val_top1": val}, self.name, step, ctx.input_size, in_budget=in_budget,
                               **source)

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
        """The reported subnet lands in the target window ``[WINDOW_LOW, 1] x target`` MACs: a
        genotype that settled below it is widened (:func:`grow_to_window`) and re-scored on
        search-val; one that cannot reach the window stays as it is (orchestrators record that)."""
        low = WINDOW_LOW * self.target_macs
        if record.macs >= low:
            return record
        if record.key not in self._grown:
            spec = grow_to_window(self.net, record.spec, self.target_macs, low, self.ctx.input_size)
            val = self._val_top1(spec) if spec != record.spec else None
            self._grown[record.key] = record if val is None else self._record(spec, val, record.step,
                                                                               grown_from=record.key)
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
        for s, stage in enumerate(self.net.stages):
            for block in stage:
                out += [(c.conv.out_channels, s) for c in block.convs]
        return out

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "w_opt": self.w_opt.state_dict(), "w_sched": self.w_sched.state_dict(),
                "a_opt": self.a_opt.state_dict(), "gen": self.gen.get_state(), "steps_done": self.steps_done,
                "seen": [r.to_dict() for r in self.seen.values()], "last_key": self.last_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.w_opt.load_state_dict(state["w_opt"])
        self.w_sched.load_state_dict(state["w_sched"])
        self.a_opt.load_state_dict(state["a_opt"])
        self.gen.set_state(state["gen"])
        self.steps_done = int(state["steps_done"])
        self.seen = {r.key: r for r in (SubnetRecord.from_dict(d) for d in state["seen"])}
        self.last_key = str(state["last_key"])
