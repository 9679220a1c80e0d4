"""TAS's width-and-depth search super-net (Dong & Yang, NeurIPS 2019), over any model family that
declares residual blocks (:meth:`rayprune.models.Family.residual_net`) and per-conv width slots
(:meth:`~rayprune.models.Family.width_slots`, :meth:`~rayprune.models.Family.with_depths`).

Every conv gets a categorical distribution over candidate widths (prefix slices of one shared
filter bank, one BN per candidate width, channel-wise interpolation to align them) and every
stage one over candidate depths. Shapes and MACs come from the family's analytic walk of the
spec, so the super-net and every genotype agree by construction. :mod:`rayprune.methods.tas`
trains it; the genotype helpers here (:func:`shrink_to_budget`, :func:`grow_to_window`) move a
genotype into the budget.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..models.analytic import Layer
from ..models.base import Spec, SpecError, WidthSlot, get_path, init_weights, set_path

__all__ = [
    "DEPTH_RULES",
    "WIDTH_RATIOS",
    "FixedPath",
    "Sample",
    "SearchResNet",
    "channel_interp",
    "depth_candidates",
    "grow_to_window",
    "imagenet_depth_candidates",
    "shrink_to_budget",
    "width_candidates",
    "zero_pad_add",
]

WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# --------------------------------------------------------------------------------------------
# Search space
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


#: A family's ``ResidualNet.depth_rule`` -> per stage, the candidate numbers of kept blocks
#: (a stage keeps its first ``d`` blocks), from the blocks per stage.
DEPTH_RULES: dict[str, Callable[[list[int]], list[tuple[int, ...]]]] = {
    "per_block": lambda counts: [depth_candidates(n) for n in counts],
    "imagenet": imagenet_depth_candidates,
}


# --------------------------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)  # bounded: one entry per (widths, device, dtype) in use
def _cwi_weight(c_in: int, c_out: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The [c_out, c_in, 1, 1] averaging matrix of 1-D adaptive average pooling along channels."""
    m = torch.zeros(c_out, c_in, dtype=torch.float64)
    for i in range(c_out):
        lo, hi = (i * c_in) // c_out, -(-((i + 1) * c_in) // c_out)  # floor, ceil: adaptive pool bins
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m.to(device=device, dtype=dtype)[:, :, None, None]


def channel_interp(x: torch.Tensor, channels: int) -> torch.Tensor:
    """TAS's channel-wise interpolation v2: adaptive average pooling over (C, H, W) to
    ``(channels, H, W)``, i.e. area interpolation along the channel axis.

    Computed as a fixed 1x1 conv (same values as ``adaptive_avg_pool3d``, faster, channels_last friendly).
    """
    if x.shape[1] == channels:
        return x
    return F.conv2d(x, _cwi_weight(x.shape[1], channels, str(x.device), x.dtype))


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

    def __init__(
        self,
        layer: Layer,
        row: int,
        candidates: tuple[int, ...],
        *,
        bn: bool = True,
        relu: bool = False,
        pool: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.kernel // 2, bias=False
        )
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
        outs = [y[:, :c] if self.bns is None else self.bns[i](y[:, :c]) for i, c in zip(picks, widths, strict=True)]
        if len(outs) == 1:
            out = outs[0]
        else:
            assert weights is not None  # several picks come with their mixture weights
            # strict=False: masked picks (ranked last by the Gumbel top-k) were dropped from outs, not from weights
            out = cast(torch.Tensor, sum(w * channel_interp(o, top) for w, o in zip(weights, outs, strict=False)))
        return F.relu(out) if self.relu else out


class SearchBlock(nn.Module):
    """A post-activation residual block of search convs; relu(zero_pad_add(convs(x), shortcut(x)))."""

    def __init__(self, convs: list[SearchConv], shortcut: SearchConv | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor, sample: Sample) -> torch.Tensor:
        y = x
        for conv in cast("Iterable[SearchConv]", self.convs):
            y = conv(y, *sample.row(conv.row))
        s = x if self.shortcut is None else self.shortcut(x, *sample.row(self.shortcut.row))
        return F.relu(zero_pad_add(y, s))  # the 2020 fix: ReLU after the add in search mode too

    def expected_macs(self, e_in: torch.Tensor, e_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected MACs, expected output width) given expected widths ``e_out`` per row."""
        macs, e = e_in.new_zeros(()), e_in
        for conv in cast("Iterable[SearchConv]", self.convs):
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
    """TAS's width-and-depth search super-net for the spec of any family that declares residual
    blocks (``cifar_resnet`` with ``avgpool_conv`` shortcuts, ``resnet`` with torchvision's
    downsample; basic or bottleneck blocks).

    Geometry comes from the family's hooks (:meth:`~rayprune.models.Family.residual_net`) and its
    analytic walk of the spec, so the super-net and every genotype agree on shapes and MACs by
    construction.

    Args:
        spec: the unpruned spec (its widths are the candidates' maxima).
        input_size: image size (family default if None); sets the spatial sizes of expected MACs.
        ratios: width ratios of the candidates.
        max_stage_prune: per stage, the maximum pruning rate; width candidates below
            ``ceil(C * (1 - rate))`` are removed. None: unconstrained.
        search_width, search_depth: False fixes widths (TAS (D)) or depths (TAS (W)) to the spec's.
        num_sampled: candidates mixed per conv (TAS's I = 2).
    """

    width_table: torch.Tensor
    width_mask: torch.Tensor
    depth_table: torch.Tensor
    depth_mask: torch.Tensor

    def __init__(
        self,
        spec: Spec,
        input_size: int | None = None,
        ratios: Sequence[float] = WIDTH_RATIOS,
        max_stage_prune: Sequence[float] | None = None,
        search_width: bool = True,
        search_depth: bool = True,
        num_sampled: int = 2,
    ) -> None:
        super().__init__()
        family = require_residual_net(spec)
        plan = family.residual_net(spec)
        n_stages = 1 + max(block.stage for block in plan.blocks)
        if max_stage_prune is not None and len(max_stage_prune) < n_stages:
            raise SpecError(
                f"tas: max_stage_prune has {len(max_stage_prune)} rates but the model has "
                f"{n_stages} stages; give one rate per stage"
            )
        self.spec = plan.spec
        self.input_size = models.input_size_of(self.spec, input_size)
        self.num_sampled = num_sampled
        walk = models.layers(self.spec, self.input_size)
        convs = {layer.name: layer for layer in walk if layer.kind == "conv"}
        fc = [layer for layer in walk if layer.kind == "linear"][-1]
        rows: list[tuple[int, ...]] = []

        def new_conv(name: str, stage: int, **kw: Any) -> SearchConv:
            layer = convs[name]
            rate = 0.0 if max_stage_prune is None else max_stage_prune[stage]
            floor = math.ceil(layer.out_channels * (1.0 - rate) - 1e-9) if max_stage_prune is not None else 1
            rows.append(width_candidates(layer.out_channels, ratios if search_width else (1.0,), floor))
            return SearchConv(layer, len(rows) - 1, rows[-1], **kw)

        self.stem = new_conv(plan.stem, 0, relu=True)
        self.stem_pool = plan.stem_pool
        stages: list[list[SearchBlock]] = [[] for _ in range(n_stages)]
        for block in plan.blocks:
            n = len(block.convs)
            block_convs = [new_conv(name, block.stage, relu=j < n - 1) for j, name in enumerate(block.convs)]
            shortcut = None
            if block.shortcut is not None:  # its output width follows the block's last conv (same row)
                last = block_convs[-1]
                shortcut = SearchConv(
                    convs[block.shortcut], last.row, last.candidates, bn=block.shortcut_bn, pool=block.shortcut_pool
                )
            stages[block.stage].append(SearchBlock(block_convs, shortcut))
        self.stages = nn.ModuleList(nn.ModuleList(s) for s in stages)
        self.fc = nn.Linear(fc.in_channels, fc.out_channels)
        init_weights(self)
        lengths = [len(s) for s in stages]
        self._init_arch(rows, DEPTH_RULES[plan.depth_rule](lengths) if search_depth else [(n,) for n in lengths])

    @property
    def family(self) -> models.Family:
        return models.family_of(self.spec)

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
        picks = [
            [i for i, v in zip(o, m, strict=True) if v] for o, m in zip(order.tolist(), valid.tolist(), strict=True)
        ]
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
        for s, stage in enumerate(cast("Iterable[nn.ModuleList]", self.stages)):
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
        assert sample.depth_weights is not None  # a sample without fixed depths mixes the stage ends
        # strict=False: the row is padded to the longest stage's candidates; the padding's weights are 0
        mixed = sum(w * channel_interp(t, top) for w, t in zip(sample.depth_weights[s], candidates, strict=False))
        return cast(torch.Tensor, mixed)

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
        for s, stage in enumerate(cast("Iterable[nn.ModuleList]", self.stages)):
            for b, block in enumerate(cast("Iterable[SearchBlock]", stage)):
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
        spec = self.family.with_depths(self.spec, [self.depth_rows[s][i] for s, i in enumerate(depth_idx)])
        for slot, _, row in self.conv_slots(spec):
            set_path(spec, slot.path, w[row])
        return spec

    def conv_slots(self, spec: Spec) -> list[tuple[WidthSlot, str, int]]:
        """For each conv width of a genotype ``spec``: (slot, layer name, super-net width row)."""
        slots = []
        for slot in self.family.width_slots(spec):
            conv = self.stem
            if slot.block is not None:  # block b of a genotype's stage is block b here
                block = cast(SearchBlock, cast(nn.ModuleList, self.stages[slot.stage])[slot.block])
                conv = cast(SearchConv, block.convs[slot.conv])
            slots.append((slot, conv.name, conv.row))
        return slots

    def depths(self, spec: Spec) -> list[int]:
        """The number of blocks of each stage of a genotype ``spec``."""
        out = [0] * len(self.stages)
        for slot in self.family.width_slots(spec):
            if slot.block is not None:
                out[slot.stage] = max(out[slot.stage], slot.block + 1)
        return out

    def fixed_sample(self, spec: Spec) -> Sample | None:
        """The single-path sample that computes genotype ``spec`` with the super-net's weights,
        or None if a width of ``spec`` is not a candidate (it has no BN in the super-net)."""
        picks = [[len(row) - 1] for row in self.width_rows]  # rows of dropped blocks are never read
        for slot, _, row in self.conv_slots(spec):
            width = get_path(spec, slot.path)
            if width not in self.width_rows[row]:
                return None
            picks[row] = [self.width_rows[row].index(width)]
        return Sample(picks, depths=self.depths(spec))

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


def shrink_to_budget(
    net: SearchResNet, spec: Spec, floors: Sequence[int], target_macs: int, input_size: int | None = None
) -> Spec:
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
            width = get_path(spec, slot.path)
            lower = [c for c in (*net.width_rows[row], floors[row]) if floors[row] <= c < width]
            if lower:
                options.append((layer_macs[name], max(lower), slot))
        if options:
            _, width, slot = max(options, key=lambda o: o[0])  # first of equals: deterministic
            set_path(spec, slot.path, width)
            continue
        depths = net.depths(spec)
        deepest = max(range(len(depths)), key=lambda s: depths[s])
        if depths[deepest] == 1:
            raise SpecError(
                f"tas: no genotype fits {target_macs} MACs even at the narrowest widths and "
                "one block per stage; raise flops_target"
            )
        depths[deepest] -= 1
        spec = net.family.with_depths(spec, depths)
    return spec


def grow_to_window(net: SearchResNet, spec: Spec, target_macs: int, low: float, input_size: int | None = None) -> Spec:
    """Widen a genotype that settled below ``low`` MACs (the other end of :func:`shrink_to_budget`):
    each round steps one conv one notch up its candidate list, the one that adds the fewest MACs
    while the genotype stays within ``target_macs``, until it reaches ``low`` or no step fits."""
    spec = copy.deepcopy(spec)
    while models.macs(spec, input_size) < low:
        best: tuple[int, Spec] | None = None
        for slot, _, row in net.conv_slots(spec):
            width = get_path(spec, slot.path)
            higher = [c for c in net.width_rows[row] if c > width]
            if not higher:
                continue
            trial = copy.deepcopy(spec)
            set_path(trial, slot.path, min(higher))
            macs = models.macs(trial, input_size)
            if macs <= target_macs and (best is None or macs < best[0]):
                best = (macs, trial)
        if best is None:
            break
        spec = best[1]
    return spec


class FixedPath(nn.Module):
    """``net(x)`` for :func:`evaluate`: the super-net restricted to one genotype."""

    def __init__(self, net: SearchResNet, sample: Sample) -> None:
        super().__init__()
        self.net, self.sample = net, sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.sample)


def require_residual_net(spec: Spec) -> models.Family:
    """The spec's family, or a one-line refusal when it declares no residual blocks."""
    family = models.family_of(spec)
    if not family.implements("residual_net"):
        supported = [n for n in models.FAMILIES if models.FAMILIES.get(n).implements("residual_net")]
        raise SpecError(
            f"tas: family {spec.get('family')!r} declares no residual blocks with per-conv width slots (the "
            f"residual_net hook) for the search super-net, which supports {' and '.join(map(repr, supported))} specs",
            fix="use e.g. the model cifar_resnet:56 or resnet:50",
            hint="model",
        )
    return family
