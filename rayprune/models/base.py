"""The family interface: a network is plain data (a JSON spec) plus these functions.

A *family* knows how to validate a spec, build an ``nn.Module`` from it, walk it analytically
(per-layer MACs and params) and describe its *channel groups*: sets of channels that must be
pruned together (e.g. every tensor tied by an identity residual). From ``tensor_axes`` (which
group indexes each dimension of each state-dict entry) all weight transfer is generic, see
:mod:`rayprune.models.transfer`.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RaypruneError
from .analytic import Layer

Spec = dict[str, Any]
Axes = tuple[str | None, ...]


# A ValueError too: raised inside pydantic validators it must become their validation error, and
# loaders catch a bad spec among other bad values.
class SpecError(RaypruneError, ValueError):
    """A spec is malformed. The message names the bad field and why."""


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned as one unit (one kept-index set)."""

    name: str  # e.g. "stem", "s0.b1.mid", "s1.b0.out"
    width: int
    stage: int  # index used by per-stage pruning-rate budgets
    kind: str  # "residual" (tied by identity shortcuts / stage output) or "inner"
    min_width: int = 1
    divisor: int = 1  # widths should stay multiples of this (MobileNet-style rounding)
    members: tuple[str, ...] = field(default_factory=tuple)  # spec field paths it sets
    # > 1: the channels of a grouped conv, in this many equal blocks that each keep width / tiles
    # channels (the width *must* be a multiple; see :mod:`rayprune.models.tiles`)
    tiles: int = 1


def round_to(channels: float, divisor: int = 1, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (torchvision's ``_make_divisible`` rule).

    Rounds to nearest, never below ``min_value`` (default ``divisor``), and never more than 10%
    below the request. With ``divisor=1`` this is ``max(1, round(channels))``.
    """
    if divisor <= 1:
        return max(min_value or 1, round(channels))
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(channels + divisor / 2) // divisor * divisor)
    if new < 0.9 * channels:
        new += divisor
    return new


def canonical_json(spec: Spec) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def spec_hash(spec: Spec) -> str:
    """A short stable hash of a spec (used as part of a subnet's key)."""
    return hashlib.sha1(canonical_json(spec).encode()).hexdigest()[:16]


def bn_axes(prefix: str, group: str | None) -> dict[str, Axes]:
    """A BatchNorm's state-dict entries: every per-channel tensor is indexed by ``group``."""
    axes: dict[str, Axes] = {f"{prefix}.{k}": (group,) for k in ("weight", "bias", "running_mean", "running_var")}
    axes[f"{prefix}.num_batches_tracked"] = ()
    return axes


class Family(abc.ABC):
    """One model family. Subclasses are registered in :mod:`rayprune.models`."""

    name: str
    default_input_size: int

    @abc.abstractmethod
    def variants(self) -> list[str]:
        """Names accepted by :meth:`full_spec` (e.g. "20", "56", "tiny")."""

    @abc.abstractmethod
    def full_spec(self, variant: str, num_classes: int = 10, **options: Any) -> Spec:
        """The unpruned spec of a variant."""

    @abc.abstractmethod
    def validate(self, spec: Spec) -> None:
        """Raise :class:`SpecError` naming the bad field."""

    @abc.abstractmethod
    def build(self, spec: Spec) -> nn.Module:
        """An ordinary nn.Module whose state_dict keys match :meth:`tensor_axes`."""

    @abc.abstractmethod
    def layers(self, spec: Spec, input_size: int) -> list[Layer]:
        """Analytic per-layer walk (conv, linear and bn entries) in forward order."""

    @abc.abstractmethod
    def channel_groups(self, spec: Spec) -> list[ChannelGroup]:
        """The prunable channel groups of this spec, in forward order."""

    @abc.abstractmethod
    def tensor_axes(self, spec: Spec) -> dict[str, Axes]:
        """For each state_dict key, the group name indexing each dimension (None = not pruned)."""

    # -- hooks of the super-net methods (TAS, SP): a family implements the ones it supports ------
    def residual_net(self, spec: Spec) -> ResidualNet:
        """The spec as a width-and-depth super-net reads it: stem, residual blocks, stages (TAS)."""
        raise SpecError(f"family {self.name!r} declares no residual blocks")

    def width_slots(self, spec: Spec) -> list[WidthSlot]:
        """Every conv width the spec sets directly, in forward order (TAS's per-conv widths)."""
        raise SpecError(f"family {self.name!r} declares no per-conv width slots")

    def with_depths(self, spec: Spec, depths: Sequence[int]) -> Spec:
        """A copy of ``spec`` keeping the first ``depths[s]`` residual blocks of each stage."""
        raise SpecError(f"family {self.name!r} cannot drop blocks")

    def stage_split(self, spec: Spec, model: nn.Module) -> StageSplit:
        """``model`` (built from ``spec``) cut at its resolution changes (SP's stages)."""
        raise SpecError(f"family {self.name!r} declares no stage split")

    @classmethod
    def implements(cls, hook: str) -> bool:
        """True when this family overrides the :class:`Family` hook named ``hook``."""
        return getattr(cls, hook) is not getattr(Family, hook)

    def with_widths(self, spec: Spec, widths: dict[str, int]) -> Spec:
        """A copy of ``spec`` with the named groups set to new widths (structure unchanged)."""
        groups = {g.name: g for g in self.channel_groups(spec)}
        out = json.loads(json.dumps(spec))  # not deepcopy: it keeps aliased lists aliased
        for name, width in widths.items():
            if name not in groups:
                raise SpecError(f"unknown channel group {name!r}; known: {', '.join(groups)}")
            if not (isinstance(width, int) and width >= 1):
                raise SpecError(f"channel group {name!r}: width must be an integer >= 1, got {width!r}")
            for path in groups[name].members:
                set_path(out, path, width)
        return out


def get_path(spec: Spec, path: str) -> Any:
    """The value at a dotted path like "stages.1.0.1" (ints index lists) in a nested spec."""
    node: Any = spec
    for k in path.split("."):
        node = node[int(k)] if isinstance(node, list) else node[k]
    return node


def set_path(spec: Spec, path: str, value: int) -> None:
    """Set a dotted path like "stages.1.0.1" (ints index lists) in a nested spec."""
    keys = path.split(".")
    node: Any = spec
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, BN gamma=1 beta=0, small normal linear (as in TAS)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# What the super-net methods read from a family (see the hooks on Family)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualBlock:
    """One residual block, by the layer names of the family's analytic walk (:meth:`Family.layers`)."""

    stage: int
    convs: tuple[str, ...]  # the block's convs in forward order
    shortcut: str | None = None  # the shortcut conv (None: identity)
    shortcut_pool: bool = False  # AvgPool2d(2) before the shortcut conv (TAS's CIFAR stride-2 shortcut)
    shortcut_bn: bool = True  # a BN after the shortcut conv


@dataclass(frozen=True)
class ResidualNet:
    """A post-activation residual net: stem conv (+ optional 3x3 stride-2 max-pool), residual
    blocks in forward order, global average pool, one linear layer.

    ``spec`` is the spec the super-net mirrors (a family may fix fields for the search, e.g. the
    stride-2 shortcut kind); every genotype keeps its other fields. ``depth_rule`` names the
    stage-depth candidates that suit the net: ``"per_block"`` (CIFAR-style stages) or
    ``"imagenet"``.
    """

    spec: Spec
    stem: str
    stem_pool: bool
    blocks: tuple[ResidualBlock, ...]
    depth_rule: str = "per_block"


@dataclass(frozen=True)
class WidthSlot:
    """One conv width of a spec: its dotted ``path`` in the spec, the conv's layer name, and where
    it sits (``block`` None: the stem; else conv ``conv`` of block ``block`` of stage ``stage``)."""

    path: str
    layer: str
    stage: int
    block: int | None = None
    conv: int = 0


#: Rewrites a parameter-free module's output for a subnet: (module, inputs, output, widths) -> output.
Fixup = Callable[[nn.Module, tuple, torch.Tensor, dict[str, int]], torch.Tensor]


@dataclass
class StageSplit:
    """A built network cut at its resolution changes.

    ``stages[s](x)`` maps stage s's input to its output (stage 0 takes images), ``head`` maps the
    last stage's output to logits, ``modules[s]`` own stage s's parameters and ``boundary[s]`` is
    the channel group of stage s's output. ``fixups`` (module name -> hook) are forward hooks
    for parameter-free modules whose masked output differs from the sliced subnet's.
    """

    stages: list[Callable[[torch.Tensor], torch.Tensor]]
    head: Callable[[torch.Tensor], torch.Tensor]
    modules: list[list[nn.Module]]
    boundary: list[str]
    fixups: dict[str, Fixup]
