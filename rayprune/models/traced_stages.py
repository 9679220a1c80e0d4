"""SP's stage split of a traced network, derived from its ``torch.fx`` graph.

SP trains a network stage by stage: each stage maps one tensor to one tensor, and the channels
of a stage's output are one channel group (its ``boundary``), so that a narrower subnet is a
prefix of them. For a traced network both come from its graph, nothing is named:

* the forward pass is traced symbolically (``torch.fx``) and its tensor shapes propagated once;
* a *cut* is a point of the graph where exactly one 4-D tensor is alive (everything after it
  depends on that tensor alone): between blocks, never inside a residual block;
* a stage ends at the last cut before each segment that lowers the resolution, and the head
  starts at the first op that leaves 4-D maps (pooling into a flatten), so the stages follow the
  resolutions as SP's split does;
* a cut's group is found by walking from the alive tensor through parameter-free ops to the
  conv, linear or BN module that produced it; a concatenation there (several groups) or a
  channel count other than the group's is refused, as is a forward ``torch.fx`` cannot trace.

SP's masks zero the dropped channels at every producer (conv, linear, BN), which computes what
the sliced subnet computes when the parameter-free ops between producers map zero to zero or
only meet zeroed channels again (ReLU, hardswish, pooling, residual adds, SE gates). No fixup
hook is derived: an op that turns a zeroed channel into a non-zero input of a later producer
(``x + 1`` before a conv) would make SP's masked super-net differ from its subnets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.passes.split_module import split_module

from .base import Axes, SpecError, StageSplit
from .trace_graph import KNOWN

VALUE_OPS = ("placeholder", "call_module", "call_function", "call_method")


def stage_split(model: nn.Module, axes: dict[str, Axes], full: dict[str, int], size: int, source: str) -> StageSplit:
    """``model`` (built from a traced spec with full widths ``full``) cut into SP's stages."""
    graph = _traced(model, size, source)
    nodes = [n for n in graph.graph.nodes if n.op in VALUE_OPS]
    cuts = _cuts(nodes)
    head_at = next((i for i, n in enumerate(nodes) if n.op != "placeholder" and _rank(n) != 4), None)
    if head_at is None or head_at not in cuts:
        raise SpecError(
            f"sp: model {source!r} has no single 4-D tensor entering its classifier, so SP has no stage split; "
            "use l1, fpgm, random, uniform or ast"
        )
    starts = [i for i in cuts if 0 < i < head_at and _lowers_resolution(nodes, i, cuts, head_at)]
    starts = [s for s in starts if cuts[s].op != "placeholder"]  # a stage is never empty
    bounds = [*starts, head_at]
    boundary = [_group_of(cuts[i], axes, full, source) for i in bounds]
    part = {}
    for i, node in enumerate(nodes):
        part[node] = sum(1 for b in bounds if b <= i)
    split = split_module(graph, model, lambda node: part.get(node, 0))
    calls = [getattr(split, f"submod_{p}") for p in range(len(bounds) + 1)]
    modules: list[list[nn.Module]] = [[] for _ in bounds]
    for node in nodes:
        if node.op == "call_module":
            modules[min(part[node], len(bounds) - 1)].append(model.get_submodule(str(node.target)))
    return StageSplit(stages=calls[:-1], head=calls[-1], modules=modules, boundary=boundary, fixups={})


def _traced(model: nn.Module, size: int, source: str) -> fx.GraphModule:
    try:
        graph = fx.symbolic_trace(model)
    except Exception as e:
        raise SpecError(
            f"sp: model {source!r}: torch.fx cannot trace its forward ({type(e).__name__}: {str(e)[:120]}), "
            "so no stage split can be derived; use l1, fpgm, random, uniform or ast"
        ) from None
    training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(graph).propagate(torch.zeros(1, 3, size, size, device=device))
    finally:
        model.train(training)
    return graph


def _rank(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else -1


def _hw(node: fx.Node) -> int:
    shape = node.meta["tensor_meta"].shape
    return int(shape[-2] * shape[-1])


def _cuts(nodes: list[fx.Node]) -> dict[int, fx.Node]:
    """Position -> the one 4-D tensor alive there (defined before, used at or after it)."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users if u in index), default=-1) for n in nodes}
    out = {}
    for i in range(1, len(nodes)):
        alive = [n for n in nodes[:i] if last_use[n] >= i]
        if len(alive) == 1 and _rank(alive[0]) == 4:
            out[i] = alive[0]
    return out


def _lowers_resolution(nodes: list[fx.Node], start: int, cuts: dict[int, fx.Node], head_at: int) -> bool:
    """True when the tensor alive at the next cut has smaller maps than the one alive at ``start``
    (maps pooled inside a block, as a squeeze-excitation does, are not a resolution change; nor
    is the pooling into the classifier)."""
    later = [c for c in cuts if start < c < head_at]
    return bool(later) and _hw(cuts[min(later)]) < _hw(cuts[start])


def _group_of(node: fx.Node, axes: dict[str, Axes], full: dict[str, int], source: str) -> str:
    """The channel group of a stage output: that of the module that produced it."""
    seen = node
    while node.op != "call_module" or not _is_producer(node):
        if node.op == "call_function" and node.target is torch.cat:
            raise SpecError(
                f"sp: model {source!r}: a stage would end in a concatenation (several channel groups), so SP has "
                "no stage split; use l1, fpgm, random, uniform or ast"
            )
        inputs = [a for a in node.all_input_nodes if _rank(a) == 4]
        if node.op == "placeholder" or not inputs:
            raise SpecError(
                f"sp: model {source!r}: no module produces the stage output {seen.name!r}, so SP has no stage "
                "split; use l1, fpgm, random, uniform or ast"
            )
        node = inputs[0]
    dims = axes.get(f"{node.target}.weight") or axes.get(f"{node.target}.running_mean") or (None,)
    group = dims[0]
    if group is None or group not in full or full[group] != seen.meta["tensor_meta"].shape[1]:
        raise SpecError(
            f"sp: model {source!r}: the stage output {seen.name!r} is not one prunable channel group "
            "(channels kept whole or reshaped), so SP has no stage split; use l1, fpgm, random, uniform or ast"
        )
    return group


def _is_producer(node: fx.Node) -> bool:
    owner: Any = node.graph.owning_module
    return owner is not None and isinstance(owner.get_submodule(str(node.target)), KNOWN)
