"""A network's channel groups, tensor axes and layer table, derived once from its dependency
graph (Torch-Pruning's :class:`~torch_pruning.DependencyGraph`, which traces autograd).

The graph couples channels through residual adds, concatenations (with index offsets),
depthwise convs, squeeze-excitation products, BN and flattens into linears. This module turns its
groups into :class:`~rayprune.models.base.ChannelGroup` objects named after the module that
produces them, and into an axis expression (:mod:`~rayprune.models.axis_expr`) for every
dimension of every state-dict tensor. It also records, per conv/linear/BN call of one forward
pass, what the exact MACs and parameters of any widths need (:class:`TracedLayer`).

A grouped (not depthwise) conv keeps its group count ``G``: the channel groups that feed or leave
it are *tiled* (:mod:`~rayprune.models.tiles`), their width a multiple of ``G`` (the lcm where a
group meets several), and the conv's weight reads its input through a blocked axis ``A/G``.

What it does not prune, it keeps whole (and says so through the axes): the network input, the
classifier's outputs, and the channels of a grouped conv whose input or output is not one whole
channel group in order (a concatenation into it, say), which no per-group divisor can express.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .analytic import Layer
from .axis_expr import Segment, axis_width, join
from .base import Axes, ChannelGroup, SpecError

KNOWN = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
Position = tuple[str | None, int]  # (group, channel of the group), group None: not pruned


@dataclass(frozen=True)
class Root:
    """What the graph says of one channel group, named after its first producer."""

    width: int
    producers: int  # conv/linear layers writing it (> 1: tied by residual adds)
    fixed: bool  # kept whole
    tiles: int = 1  # lcm of the group counts of the grouped convs it feeds or leaves


class ForwardFailed(SpecError):
    """A forward pass failed: on the meta device possibly for want of data, so worth a CPU retry."""


@dataclass(frozen=True)
class TracedLayer:
    """One call of a conv, linear or BN module in the traced forward pass."""

    name: str
    kind: str  # "conv" | "linear" | "bn"
    in_axis: str | None
    out_axis: str | None
    in_full: int
    out_full: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    groups: int = 1
    depthwise: bool = False
    bias: bool = False
    out_hw: tuple[int, int] = (1, 1)
    rows: int = 1  # a linear's rows per sample (1 after a flatten)
    first_call: bool = True  # later calls of a shared module add MACs, not parameters
    affine: bool = True

    def layer(self, widths: dict[str, int]) -> Layer:
        """The analytic entry of this call when each group has ``widths[group]`` channels."""
        cout = axis_width(self.out_axis, widths) if self.out_axis else self.out_full
        cin = cout if self.depthwise else (axis_width(self.in_axis, widths) if self.in_axis else self.in_full)
        if self.kind == "bn":
            params = 2 * cout if self.affine and self.first_call else 0
            return Layer(self.name, "bn", cin, cout, out_hw=self.out_hw, params=params)
        groups = cout if self.depthwise else self.groups
        kh, kw = self.kernel
        weights = kh * kw * (cin // groups) * cout
        positions = self.out_hw[0] * self.out_hw[1] * self.rows
        bias_macs = cout * positions if self.bias else 0
        params = (weights + (cout if self.bias else 0)) if self.first_call else 0
        return Layer(
            self.name,
            self.kind,
            cin,
            cout,
            kernel=kh,
            stride=self.stride,
            groups=groups,
            bias=self.bias,
            out_hw=self.out_hw,
            macs=weights * positions + bias_macs,
            params=params,
            bias_macs=bias_macs,
        )


@dataclass(frozen=True)
class Trace:
    """What a traced family knows of one source at one input size (full widths)."""

    groups: tuple[ChannelGroup, ...]
    axes: dict[str, Axes]
    layers: tuple[TracedLayer, ...]


@dataclass(frozen=True)
class Call:
    name: str
    out_shape: tuple[int, ...]


def is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def is_grouped(module: nn.Module) -> bool:
    """A conv with groups > 1 that is not depthwise (its group count stays when pruned)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module)


def check_modules(model: nn.Module, source: str) -> None:
    """Refuse a module that holds parameters the tracer cannot prune (LayerNorm, a raw Parameter)."""
    for name, module in model.named_modules():
        if isinstance(module, KNOWN):
            continue
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if own:
            raise SpecError(
                f"model {source!r}: module {name or '<root>'!r} ({type(module).__name__}) holds parameters "
                f"{', '.join(own)} the tracer cannot prune (it knows Conv2d, Linear and BatchNorm); "
                "use those or prune another model"
            )


@contextmanager
def recorded_calls(model: nn.Module) -> Iterator[list[Call]]:
    """Collect every conv/linear/BN call (module name, output shape) of the forward passes inside."""
    calls: list[Call] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, KNOWN):

            def hook(_m: nn.Module, _i: Any, out: torch.Tensor, name: str = name) -> None:
                calls.append(Call(name, tuple(out.shape)))

            handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def forward_calls(model: nn.Module, input_size: int, source: str) -> list[Call]:
    """The conv/linear/BN calls of one forward pass of a batch of one at ``input_size``."""
    x = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
    with recorded_calls(model) as calls, torch.no_grad():
        try:
            model(x)
        except Exception as e:
            raise ForwardFailed(
                f"model {source!r} fails on a {input_size}x{input_size} input: {type(e).__name__}: {e}; "
                "give an input size it accepts"
            ) from None
    return calls


def _unreached(model: nn.Module, calls: list[Call]) -> str | None:
    called = {c.name for c in calls}
    for name, module in model.named_modules():
        if isinstance(module, KNOWN) and name not in called and any(True for _ in module.parameters()):
            return name
    return None


def derive(model: nn.Module, input_size: int, source: str) -> Trace:
    """The groups, axes and layer table of ``model`` (unpruned, in eval mode) at ``input_size``."""
    check_modules(model, source)
    model.eval()
    calls = forward_calls(model, input_size, source)
    missed = _unreached(model, calls)
    if missed is not None:
        raise SpecError(
            f"model {source!r}: module {missed!r} is not called in a forward pass (data-dependent control "
            "flow or an unused branch); turn the branch off through the factory's options"
        )
    heads = [c.name for c in calls if isinstance(model.get_submodule(c.name), (nn.Conv2d, nn.Linear))]
    if not heads:
        raise SpecError(f"model {source!r} has no Conv2d or Linear layer to prune")
    order = {name: i for i, name in reversed(list(enumerate(c.name for c in calls)))}
    positions, roots = _graph_positions(model, input_size, source, heads[-1], order)
    widths = {name: root.width for name, root in roots.items()}
    axes_of = {key: _expression(pos, size, widths, source, key) for key, (pos, size) in positions.items()}
    axes = _state_axes(model, axes_of)
    layers = _table(model, calls, axes_of)
    return Trace(_groups(roots, calls, layers), axes, layers)


def _graph_positions(
    model: nn.Module, input_size: int, source: str, head: str, order: dict[str, int]
) -> tuple[dict[str, tuple[dict[int, Position], int]], dict[str, Root]]:
    """Per ``"module:dim"``, the group channel at each pruned position; per group, its :class:`Root`."""
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    example = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        found = list(
            graph.get_all_groups(ignored_layers=[model.get_submodule(head)], root_module_types=[nn.Conv2d, nn.Linear])
        )
    except Exception as e:
        raise SpecError(f"model {source!r}: its dependency graph cannot be built ({type(e).__name__}: {e})") from None
    positions: dict[str, tuple[dict[int, Position], int]] = {}
    roots: dict[str, Root] = {}
    for group in found:
        items = [it for it in group.items if isinstance(it.dep.target.module, KNOWN)]
        # The group is named after its first producer in forward order (stable, readable).
        made = [names[it.dep.target.module] for it in items if it.dep.handler.__name__ == "prune_out_channels"]
        made = [n for n in made if isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear))]
        root = min(made, key=lambda n: order.get(n, len(order)))
        tiles = _tiles(items)
        fixed = tiles is None
        producers = 0
        for it in items:
            module = it.dep.target.module
            out = it.dep.handler.__name__ == "prune_out_channels"
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                dim = 0
            elif out:
                dim, producers = 0, producers + (0 if is_depthwise(module) else 1)
            elif is_depthwise(module):
                continue  # its input dim has size 1; the output side carries the group
            else:
                dim = 1
            key = f"{names[module]}:{dim}"
            table, _ = positions.setdefault(key, ({}, _dim_size(module, dim)))
            for idx, ridx in zip(it.idxs, it.root_idxs, strict=True):
                if int(idx) in table and table[int(idx)][0] != (None if fixed else root):
                    raise SpecError(f"model {source!r}: channel {idx} of {names[module]!r} belongs to two groups")
                table[int(idx)] = (None if fixed else root, int(ridx))
        roots[root] = Root(len(group.items[0].idxs), producers, fixed, tiles or 1)
    return positions, roots


def _tiles(items: list[Any]) -> int | None:
    """The lcm of the group counts of the grouped convs among a graph group's ``items``, or None
    when one of them sees the group other than as its whole input or output, in channel order (a
    concatenation into it): blocks of such a conv would mix groups, so the group is kept whole."""
    tiles = 1
    for it in items:
        module = it.dep.target.module
        if not is_grouped(module):
            continue
        dim = 0 if it.dep.handler.__name__ == "prune_out_channels" else 1
        idxs, root_idxs = [int(i) for i in it.idxs], [int(i) for i in it.root_idxs]
        if idxs != root_idxs or sorted(idxs) != list(range(_dim_size(module, dim))):
            return None
        tiles = math.lcm(tiles, module.groups)
    return tiles


def _dim_size(module: nn.Module, dim: int) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels if dim == 0 else module.in_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features if dim == 0 else module.in_features)
    return int(module.num_features)  # type: ignore[arg-type]


def _expression(pos: dict[int, Position], size: int, widths: dict[str, int], source: str, key: str) -> str | None:
    """The axis expression of one tensor dimension (see :mod:`~rayprune.models.axis_expr`)."""
    parts: list[Segment] = []
    p = 0
    while p < size:
        group = pos.get(p, (None, 0))[0]
        q = p
        while q < size and pos.get(q, (None, 0))[0] == group:
            q += 1
        run = q - p
        if group is None:
            parts.append((None, run))
        else:
            repeat = run // widths[group]
            if run % widths[group] or any(pos[p + i][1] != i // repeat for i in range(run)):
                module = key.rpartition(":")[0]
                raise SpecError(
                    f"model {source!r}: the channels entering {module!r} follow a reshape the tracer cannot "
                    "express (only concatenations and flattens of whole maps); prune another model"
                )
            parts.append((group, repeat))
        p = q
    return join(parts)


def _state_axes(model: nn.Module, axes_of: dict[str, str | None]) -> dict[str, Axes]:
    """For every state-dict entry, the axis expression of each dimension."""
    out: dict[str, Axes] = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        tensors = {**module._parameters, **module._buffers}
        for pname, t in tensors.items():
            if t is None:
                continue
            key = f"{prefix}{pname}"
            if isinstance(module, KNOWN) and t.ndim >= 1:
                a0 = axes_of.get(f"{mname}:0")
                a1 = None if is_depthwise(module) or t.ndim < 2 else axes_of.get(f"{mname}:1")
                if a1 is not None and isinstance(module, nn.Conv2d) and is_grouped(module):
                    a1 = f"{a1}/{module.groups}"
                out[key] = (a0, a1, *([None] * (t.ndim - 2))) if t.ndim >= 2 else (a0,)
            else:
                out[key] = (None,) * t.ndim
    for key in model.state_dict():
        out.setdefault(key, ())
    return {key: out[key] for key in model.state_dict()}


def _table(model: nn.Module, calls: list[Call], axes_of: dict[str, str | None]) -> tuple[TracedLayer, ...]:
    seen: set[str] = set()
    rows = []
    for call in calls:
        m = model.get_submodule(call.name)
        first = call.name not in seen
        seen.add(call.name)
        out_axis = axes_of.get(f"{call.name}:0")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            hw = (call.out_shape[2], call.out_shape[3]) if len(call.out_shape) >= 4 else (1, 1)
            rows.append(
                TracedLayer(
                    call.name,
                    "bn",
                    out_axis,
                    out_axis,
                    m.num_features,
                    m.num_features,
                    out_hw=hw,
                    first_call=first,
                    affine=m.affine,
                )
            )
        elif isinstance(m, nn.Conv2d):
            rows.append(
                TracedLayer(
                    call.name,
                    "conv",
                    None if is_depthwise(m) else axes_of.get(f"{call.name}:1"),
                    out_axis,
                    m.in_channels,
                    m.out_channels,
                    kernel=(m.kernel_size[0], m.kernel_size[1]),
                    stride=m.stride[0],
                    groups=m.groups,
                    depthwise=is_depthwise(m),
                    bias=m.bias is not None,
                    out_hw=(call.out_shape[-2], call.out_shape[-1]),
                    first_call=first,
                )
            )
        else:
            assert isinstance(m, nn.Linear)
            n_rows = 1
            for d in call.out_shape[1:-1]:
                n_rows *= d
            rows.append(
                TracedLayer(
                    call.name,
                    "linear",
                    axes_of.get(f"{call.name}:1"),
                    out_axis,
                    m.in_features,
                    m.out_features,
                    bias=m.bias is not None,
                    rows=n_rows,
                    first_call=first,
                )
            )
    return tuple(rows)


def _resolution(layer: TracedLayer) -> tuple[int, int]:
    return layer.out_hw if layer.kind == "conv" else (1, 1)


def _groups(roots: dict[str, Root], calls: list[Call], layers: tuple[TracedLayer, ...]) -> tuple[ChannelGroup, ...]:
    """The prunable groups in forward order of their root; a group's stage is the index of its
    root's output resolution among the net's resolutions, largest first."""
    producing = [layer for layer in layers if layer.kind != "bn"]
    resolutions = sorted({_resolution(layer) for layer in producing}, key=lambda hw: (-hw[0] * hw[1], -hw[0]))
    first: dict[str, TracedLayer] = {}
    for layer in producing:
        first.setdefault(layer.name, layer)
    out = []
    for name in sorted((r for r in roots if not roots[r].fixed), key=lambda r: [c.name for c in calls].index(r)):
        root = roots[name]
        stage = resolutions.index(_resolution(first[name]))
        kind = "residual" if root.producers > 1 else "inner"
        out.append(
            ChannelGroup(
                name,
                root.width,
                stage,
                kind,
                min_width=root.tiles,
                divisor=root.tiles,
                members=(f"widths.{name}",),
                tiles=root.tiles,
            )
        )
    return tuple(out)
