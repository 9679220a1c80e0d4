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
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

Spec = dict[str, Any]
Axes = tuple[str | None, ...]


class SpecError(ValueError):
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


def conv_layer(name: str, cin: int, cout: int, k: int, stride: int, hw: tuple[int, int],
               groups: int = 1, bias: bool = False, padding: int | None = None) -> Layer:
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
    return Layer(name, "linear", cin, cout, bias=bias, macs=cin * cout + bias_macs,
                 params=cin * cout + bias_macs, bias_macs=bias_macs)


def bn_layer(name: str, c: int, hw: tuple[int, int]) -> Layer:
    """BatchNorm: no MACs (convention), 2*C learnable params."""
    return Layer(name, "bn", c, c, out_hw=hw, params=2 * c)


def round_to(channels: float, divisor: int = 1, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (torchvision's ``_make_divisible`` rule).

    Rounds to nearest, never below ``min_value`` (default ``divisor``), and never more than 10%
    below the request. With ``divisor=1`` this is ``max(1, round(channels))``.
    """
    if divisor <= 1:
        return max(min_value or 1, int(round(channels)))
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
                _set_path(out, path, width)
        return out


def _set_path(spec: Spec, path: str, value: int) -> None:
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

