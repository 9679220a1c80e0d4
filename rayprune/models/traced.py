"""Any torchvision-style CNN as a family: channel groups and tensor axes from its dependency graph.

Spec::

    {"family": "traced", "source": "torchvision:resnet18", "options": {}, "num_classes": 10,
     "input_size": 64, "widths": {"conv1": 64, "layer1.0.conv1": 64, ...}}

* ``source``: ``torchvision:NAME``, ``/abs/path/file.py:FACTORY`` or ``package.module:FACTORY``
  (:mod:`~rayprune.models.sources`); ``options``: keyword arguments of the factory (JSON);
* ``widths``: the width of every channel group, each between 1 and the unpruned width, and a
  multiple of the group's divisor where it meets a grouped conv (:mod:`.tiles`).

The graph is traced once per (source, options, classes, input size) and checked before use: a
forward pass of the net with every group halved must run, and its MACs and parameters must equal
the traced table's (``FlopCounterMode`` plus the bias terms it omits). A net that fails either is
refused in one line, so no count is silently wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .analytic import Layer
from .axis_expr import axis_width, block_columns, blocked, kept_positions
from .base import Axes, ChannelGroup, Family, Spec, SpecError, StageSplit
from .sources import absolute_source, build_source
from .tiles import check_width, first_channels
from .trace_graph import ForwardFailed, Trace, TracedLayer, derive

FIELDS = {"family", "source", "options", "num_classes", "input_size", "widths"}
DEFAULT_INPUT_SIZE = 224


class TracedFamily(Family):
    """A user's network (any source) pruned through its traced dependency graph."""

    name = "traced"
    default_input_size = DEFAULT_INPUT_SIZE

    def variants(self) -> list[str]:
        return ["torchvision:NAME", "FILE.py:FACTORY", "MODULE:FACTORY"]

    def full_spec(self, variant: str, num_classes: int = 10, **options: Any) -> Spec:
        size = options.pop("input_size", None) or DEFAULT_INPUT_SIZE
        source = absolute_source(variant)
        try:
            opts = json.dumps(options, sort_keys=True)
        except TypeError:
            raise SpecError(f"model {variant!r}: factory options must be JSON values, got {options!r}") from None
        trace = traced(source, opts, num_classes, size)
        widths = {g.name: g.width for g in trace.groups}
        return {
            "family": self.name,
            "source": source,
            "options": json.loads(opts),
            "num_classes": num_classes,
            "input_size": size,
            "widths": widths,
        }

    def validate(self, spec: Spec) -> None:
        unknown = sorted(set(spec) - FIELDS)
        if unknown:
            raise SpecError(f"traced spec: unknown field {unknown[0]!r}; fields: {', '.join(sorted(FIELDS))}")
        for key, kind in (
            ("source", str),
            ("options", dict),
            ("num_classes", int),
            ("input_size", int),
            ("widths", dict),
        ):
            if not isinstance(spec.get(key), kind) or isinstance(spec.get(key), bool):
                raise SpecError(f"traced spec field {key!r} must be a {kind.__name__}, got {spec.get(key)!r}")
        if spec["num_classes"] < 1 or spec["input_size"] < 1:
            raise SpecError("traced spec fields 'num_classes' and 'input_size' must be >= 1")
        full = {g.name: g.width for g in self._trace(spec).groups}
        widths = spec["widths"]
        if widths.keys() != full.keys():
            missing = sorted(full.keys() - widths.keys()) or sorted(widths.keys() - full.keys())
            raise SpecError(
                f"traced spec field 'widths' must name every channel group of {spec['source']} exactly once; "
                f"first mismatch: {missing[0]!r}"
            )
        tiles = {g.name: g.tiles for g in self._trace(spec).groups}
        for name, width in widths.items():
            if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= full[name]:
                raise SpecError(f"channel group {name!r}: width must be an integer in [1, {full[name]}], got {width!r}")
            check_width(name, width, tiles[name])

    def build(self, spec: Spec) -> nn.Module:
        trace = self._trace(spec)
        model = build_source(spec["source"], spec["num_classes"], spec["options"])
        return loads_plain_dicts(shrunk(model, trace, spec["widths"]))

    def layers(self, spec: Spec, input_size: int) -> list[Layer]:
        trace = traced(spec["source"], _options(spec), spec["num_classes"], input_size)
        return [row.layer(spec["widths"]) for row in trace.layers]

    def channel_groups(self, spec: Spec) -> list[ChannelGroup]:
        return [dataclasses.replace(g, width=spec["widths"][g.name]) for g in self._trace(spec).groups]

    def tensor_axes(self, spec: Spec) -> dict[str, Axes]:
        return dict(self._trace(spec).axes)

    def with_widths(self, spec: Spec, widths: dict[str, int]) -> Spec:
        groups = {g.name: g for g in self._trace(spec).groups}
        out = json.loads(json.dumps(spec))
        for name, width in widths.items():
            if name not in groups:
                raise SpecError(f"unknown channel group {name!r}; known: {', '.join(groups)}")
            full = groups[name].width
            if not (isinstance(width, int) and 1 <= width <= full):
                raise SpecError(f"channel group {name!r}: width must be an integer in [1, {full}], got {width!r}")
            check_width(name, width, groups[name].tiles)
            out["widths"][name] = width
        return out

    def stage_split(self, spec: Spec, model: nn.Module) -> StageSplit:
        """SP's stages, cut at the graph's resolution changes (:mod:`.traced_stages`)."""
        from .traced_stages import stage_split

        full = {g.name: g.width for g in self._trace(spec).groups}
        return stage_split(model, self.tensor_axes(spec), full, spec["input_size"], spec["source"])

    def _trace(self, spec: Spec) -> Trace:
        return traced(spec["source"], _options(spec), spec["num_classes"], spec["input_size"])


def _options(spec: Spec) -> str:
    return json.dumps(spec.get("options", {}), sort_keys=True)


@functools.lru_cache(maxsize=64)
def traced(source: str, options: str, num_classes: int, input_size: int) -> Trace:
    """The checked trace of a source (cached per process; ``options`` is canonical JSON).

    Shapes are all it needs, so it runs on the meta device (no initialisation, no compute); a
    factory or an op that does not work there is traced on the CPU.
    """
    try:
        return _checked_trace(source, json.loads(options), num_classes, input_size, torch.device("meta"))
    except ForwardFailed:
        pass
    except SpecError:  # a refusal that holds on any device
        raise
    except Exception:  # an op without a meta kernel: the CPU pass below raises the real error, if any
        pass
    return _checked_trace(source, json.loads(options), num_classes, input_size, torch.device("cpu"))


def _checked_trace(
    source: str, options: dict[str, Any], num_classes: int, input_size: int, device: torch.device
) -> Trace:
    with torch.random.fork_rng(devices=[]), device:
        model = _built_on(device, source, num_classes, options)
        trace = derive(model, input_size, source)
        full = {g.name: g.width for g in trace.groups}
        check_counts(model, trace, full, input_size, num_classes, source)
        half = {g.name: max(g.divisor, g.width // 2 // g.divisor * g.divisor) for g in trace.groups}
        pruned = shrunk(_built_on(device, source, num_classes, options), trace, half)
        check_counts(pruned, trace, half, input_size, num_classes, source)
    return trace


def _built_on(device: torch.device, source: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    try:
        return build_source(source, num_classes, options)
    except SpecError as e:
        if device.type == "meta":  # an initialiser that needs data: worth a CPU retry
            raise ForwardFailed(str(e)) from None
        raise


def check_counts(
    model: nn.Module, trace: Trace, widths: dict[str, int], input_size: int, num_classes: int, source: str
) -> None:
    """Refuse the source unless ``model`` runs and its MACs/params equal the traced table's."""
    rows = [row.layer(widths) for row in trace.layers]
    x = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model(x)
    except Exception as e:
        raise ForwardFailed(
            f"model {source!r}: a pruned copy fails in its forward pass ({type(e).__name__}: {str(e)[:160]}); "
            "an op couples channels in a way the tracer does not follow"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(f"model {source!r} returns {got}, not logits of shape (N, {num_classes})")
    macs = sum(r.macs - r.bias_macs for r in rows)
    if counter.get_total_flops() != 2 * macs:
        raise SpecError(
            f"model {source!r}: FlopCounterMode counts {counter.get_total_flops() // 2} MACs but its Conv2d and "
            f"Linear modules {macs}; ops outside those modules (functional convs, matmuls) cannot be pruned"
        )
    if sum(r.params for r in rows) != sum(p.numel() for p in model.parameters()):
        raise SpecError(f"model {source!r}: parameters outside its Conv2d, Linear and BatchNorm modules")


def shrunk(model: nn.Module, trace: Trace, widths: dict[str, int]) -> nn.Module:
    """``model`` (unpruned) resized in place to ``widths``, keeping the first channels of each
    group (of each block of a tiled group), so the initialisation keeps its distribution."""
    full = {g.name: g.width for g in trace.groups}
    if all(widths[name] == width for name, width in full.items()):
        return model
    keep = {g.name: first_channels(g.width, widths[g.name], g.tiles) for g in trace.groups}
    state = sliced_state(model.state_dict(), trace.axes, keep, full)
    done: set[str] = set()
    for row in trace.layers:
        if row.name not in done:
            done.add(row.name)
            _resize(model.get_submodule(row.name), row, widths)
    model.load_state_dict(state)
    return model


def sliced_state(
    state: Mapping[str, torch.Tensor], axes: dict[str, Axes], keep: dict[str, torch.Tensor], full: dict[str, int]
) -> dict[str, torch.Tensor]:
    """``state`` indexed down to the kept channels along every pruned axis (with its metadata)."""
    out = with_metadata_of(state)
    for key, dims in axes.items():
        t = state[key]
        rows = torch.arange(t.shape[0] if dims else 0, device="cpu")
        for dim, axis in enumerate(dims):
            if axis is None:
                continue
            if blocked(axis) is not None:  # a grouped conv's input (dim 1): columns depend on the row
                cols = block_columns(axis, keep, full, rows, state[key].shape[0]).to(t.device)
                t = t.gather(1, cols.view(*cols.shape, *[1] * (t.ndim - 2)).expand(-1, -1, *t.shape[2:]))
                continue
            index = kept_positions(axis, keep, full)
            rows = index.cpu() if dim == 0 else rows
            t = t.index_select(dim, index.to(t.device))
        out[key] = t
    return out


def with_metadata_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An empty state dict carrying ``state``'s per-module metadata (the ``version`` of each
    module's state format), which modules such as torchvision's MNASNet require when loading."""
    out: dict[str, torch.Tensor] = OrderedDict()
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def loads_plain_dicts(model: nn.Module) -> nn.Module:
    """``model``, whose ``load_state_dict`` also takes a plain dict of its own weights.

    rayprune copies weights as plain dicts (``{k: v.clone() ...}``), which drops the per-module
    ``version`` metadata of a state dict. A module whose loader checks that version (torchvision's
    MNASNet refuses ``None``) would then refuse weights of its own build. Such a model reads a dict
    without metadata with the metadata of this build: the format every rayprune copy was taken in.
    Other models are returned untouched.
    """
    if not any(_checks_its_version(type(m)) for m in model.modules()):
        return model
    model._build_metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    # A bound method (not a closure), so a deepcopy of the model loads into the copy.
    model.load_state_dict = types.MethodType(_load_with_build_metadata, model)  # type: ignore[method-assign]
    return model


def _checks_its_version(cls: type[nn.Module]) -> bool:
    # torch.nn's own loaders (BatchNorm's) read a missing version as the oldest and cope.
    overridden = cls._load_from_state_dict is not nn.Module._load_from_state_dict
    return overridden and not cls._load_from_state_dict.__module__.startswith("torch.nn.")


def _load_with_build_metadata(
    self: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
) -> Any:
    if getattr(state_dict, "_metadata", None) is None:
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = self._build_metadata  # type: ignore[attr-defined]
    return type(self).load_state_dict(self, state_dict, strict=strict, assign=assign)


# Pickle rebuilds a bound method as getattr(model, __name__): the unpickled model gets the class's own.
_load_with_build_metadata.__name__ = "load_state_dict"


def _resize(module: nn.Module, row: TracedLayer, widths: dict[str, int]) -> None:
    cin = axis_width(row.in_axis, widths) if row.in_axis else row.in_full
    cout = axis_width(row.out_axis, widths) if row.out_axis else row.out_full
    like = next(module.parameters(), None)
    kw: dict[str, Any] = {
        "device": like.device if like is not None else None,
        "dtype": like.dtype if like is not None else None,
    }

    def param(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, **kw))

    if isinstance(module, nn.Conv2d):
        groups = cout if row.depthwise else module.groups
        module.in_channels, module.out_channels, module.groups = (cout if row.depthwise else cin), cout, groups
        module.weight = param(cout, module.in_channels // groups, *module.kernel_size)
        if module.bias is not None:
            module.bias = param(cout)
    elif isinstance(module, nn.Linear):
        module.in_features, module.out_features = cin, cout
        module.weight = param(cout, cin)
        if module.bias is not None:
            module.bias = param(cout)
    else:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        module.num_features = cout
        if module.affine:
            module.weight, module.bias = param(cout), param(cout)
        if module.running_mean is not None:
            module.running_mean = torch.zeros(cout, **kw)
            module.running_var = torch.ones(cout, **kw)
