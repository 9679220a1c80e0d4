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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RaypruneError
from ..registry import hint

Spec = dict[str, Any]
Axes = tuple[str | None, ...]


# A ValueError too: raised inside pydantic validators it must become their validation error, and
# loaders catch a bad spec among other bad values.
class SpecError(RaypruneError, ValueError):
    """A spec is malformed. The message names the bad field and why."""


@dataclass(frozen=True)
class Layer:
    """One analytically counted layer (conv, linear or bn)."""

    name: str  # module path in the built model, e.g. "stages.1.0.conv1"
    kind: str  # "conv" | "linear" | "bn"
    in_channels: int
    out_channels: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    bias: bool = False
    out_hw: tuple[int, int] = (1, 1)
    macs: int = 0
    params: int = 0
    bias_macs: int = 0  # part of ``macs`` that FlopCounterMode does not see

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_hw"] = list(self.out_hw)
        return d


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


def conv_layer(
    name: str,
    cin: int,
    cout: int,
    k: int,
    stride: int,
    hw: tuple[int, int],
    groups: int = 1,
    bias: bool = False,
    padding: int | None = None,
) -> Layer:
    """A conv's analytic entry: k*k*(cin/groups)*cout*H_out*W_out (+ cout*H_out*W_out bias)."""
    pad = k // 2 if padding is None else padding
    h = (hw[0] + 2 * pad - k) // stride + 1
    w = (hw[1] + 2 * pad - k) // stride + 1
    core = k * k * (cin // groups) * cout * h * w
    bias_macs = cout * h * w if bias else 0
    params = k * k * (cin // groups) * cout + (cout if bias else 0)
    return Layer(name, "conv", cin, cout, k, stride, groups, bias, (h, w), core + bias_macs, params, bias_macs)


def linear_layer(name: str, cin: int, cout: int, bias: bool = True) -> Layer:
    """A linear layer's entry: in*out (+ out for the bias)."""
    bias_macs = cout if bias else 0
    return Layer(
        name,
        "linear",
        cin,
        cout,
        bias=bias,
        macs=cin * cout + bias_macs,
        params=cin * cout + bias_macs,
        bias_macs=bias_macs,
    )


def bn_layer(name: str, c: int, hw: tuple[int, int]) -> Layer:
    """BatchNorm: no MACs (convention), 2*C learnable params."""
    return Layer(name, "bn", c, c, out_hw=hw, params=2 * c)


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


def require(cond: bool, field_name: str, why: str) -> None:
    """Validation helper: raise a SpecError naming ``field_name`` unless ``cond``."""
    if not cond:
        raise SpecError(f"spec field {field_name!r}: {why}")


def require_choice(value: Any, choices: Iterable[str], field_name: str) -> None:
    """``value`` is one of ``choices`` (a string: a list or number is refused, not looked up)."""
    choices = list(choices)
    if isinstance(value, str) and value in choices:
        return
    require(
        False, field_name, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint(value, choices)}"
    )


def require_int(value: Any, field_name: str, minimum: int = 1) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, field_name, f"must be an integer >= {minimum}, got {value!r}")


def validate_input_size(spec: Spec) -> None:
    """The optional ``input_size`` hint shared by the ImageNet-style families."""
    if "input_size" in spec:
        require_int(spec["input_size"], "input_size")


def check_fields(obj: dict[str, Any], known: set[str], required: tuple[str, ...], where: str = "") -> None:
    """Reject unknown fields and require the mandatory ones, naming the field (``where`` prefixes
    the names of a nested object's fields, e.g. "stages[1].")."""
    extra = sorted(set(obj) - known)
    require(not extra, where + (extra[0] if extra else ""), f"unknown field; known: {', '.join(sorted(known))}")
    for key in required:
        require(key in obj, where + key, "is required")


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
