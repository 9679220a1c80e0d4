"""Weight transfer between a network and its subnets, generic over families.

A subnet of ``spec`` is described by the kept channel indices of each channel group
(``keep: {group_name: LongTensor}``; a missing group keeps everything). Because every family
declares which group indexes each dimension of each state-dict tensor
(:meth:`Family.tensor_axes`), extracting a subnet is ``index_select`` along those dimensions and
writing it back is ``index_copy``. Residual-coupled tensors share one group, so residual adds
stay aligned. An axis fed by a concatenation or a flatten names several groups
(:mod:`~rayprune.models.axis_expr`); its kept positions follow from theirs. A group that meets a
grouped conv must keep the same count in each of its blocks (:mod:`~rayprune.models.tiles`).

Caveat: the parameter-free ``option_a`` shortcut aligns channels by position, not by index, so
for it a transfer is exact everywhere except through the stride-2 shortcuts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import channel_groups, tensor_axes, with_widths
from .axis_expr import block_columns, blocked, kept_positions
from .base import Spec, SpecError
from .tiles import check_keep
from .traced import sliced_state

Keep = Mapping[str, torch.Tensor]


def full_keep(spec: Spec) -> dict[str, torch.Tensor]:
    """Every channel of every group (the identity subnet)."""
    return {g.name: torch.arange(g.width) for g in channel_groups(spec)}


def _checked_keep(spec: Spec, keep: Keep) -> dict[str, torch.Tensor]:
    groups = {g.name: g for g in channel_groups(spec)}
    out = full_keep(spec)
    for name, idx in keep.items():
        if name not in groups:
            raise SpecError(f"unknown channel group {name!r}; known: {', '.join(groups)}")
        width = groups[name].width
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        if idx.numel() == 0:
            raise SpecError(f"channel group {name!r}: must keep at least one channel")
        if idx.min() < 0 or idx.max() >= width or idx.unique().numel() != idx.numel():
            raise SpecError(f"channel group {name!r}: kept indices must be distinct and in [0, {width})")
        check_keep(name, idx.cpu(), width, groups[name].tiles)
        out[name] = idx.sort().values
    return out


def subnet_spec(spec: Spec, keep: Keep) -> Spec:
    """The spec of the subnet that keeps ``keep`` channels."""
    keep = _checked_keep(spec, keep)
    return with_widths(spec, {name: int(idx.numel()) for name, idx in keep.items()})


def extract_subnet(spec: Spec, state: Mapping[str, torch.Tensor], keep: Keep) -> tuple[Spec, dict[str, torch.Tensor]]:
    """Slice a full network's state_dict down to a subnet's. Returns (subnet spec, subnet state)."""
    keep = _checked_keep(spec, keep)
    sub = with_widths(spec, {name: int(idx.numel()) for name, idx in keep.items()})
    axes_by_key = tensor_axes(spec)
    if tensor_axes(sub).keys() != axes_by_key.keys():
        # Only possible for specs whose projection shortcuts depend on unequal widths (e.g. a
        # TAS genotype) when pruning makes the widths equal: the subnet has other modules.
        raise SpecError(
            "these kept channels change the network's structure (a width-dependent projection "
            "shortcut appears or disappears); keep the widths on both sides of it unequal"
        )
    out = sliced_state(state, axes_by_key, keep, _full_widths(spec))
    for key in axes_by_key:  # unpruned tensors are the caller's own: the subnet gets copies
        out[key] = out[key].clone()
    return sub, out


def _full_widths(spec: Spec) -> dict[str, int]:
    return {g.name: g.width for g in channel_groups(spec)}


@torch.no_grad()
def write_back(
    spec: Spec, state: Mapping[str, torch.Tensor], keep: Keep, sub_state: Mapping[str, torch.Tensor]
) -> None:
    """Write a subnet's tensors into the full network's state (in place) at the kept indices."""
    keep = _checked_keep(spec, keep)
    full = _full_widths(spec)
    for key, axes in tensor_axes(spec).items():
        dst, src = state[key], sub_state[key]
        if not axes:  # scalars such as num_batches_tracked
            dst.copy_(src)
            continue
        # Advanced indexing needs one index per dimension: the kept indices on pruned dims, a
        # full arange on the others (the grid is as large as the sub-tensor, fine for one layer).
        index = [
            kept_positions(a, keep, full).to(dst.device) if a is not None and blocked(a) is None else None for a in axes
        ]
        lines = [i if i is not None else torch.arange(src.shape[d], device=dst.device) for d, i in enumerate(index)]
        grids = list(torch.meshgrid(*lines, indexing="ij"))
        if len(axes) > 1 and axes[1] is not None and blocked(axes[1]) is not None:  # a grouped conv's input
            rows = torch.arange(dst.shape[0], device="cpu") if axes[0] is None else kept_positions(axes[0], keep, full)
            cols = block_columns(axes[1], keep, full, rows.cpu(), dst.shape[0]).to(dst.device)
            grids[1] = cols.view(*cols.shape, *[1] * (dst.ndim - 2)).expand_as(grids[0])
        dst[tuple(grids)] = src.to(dst.dtype)


@torch.no_grad()
def zero_dropped(spec: Spec, state: Mapping[str, torch.Tensor], keep: Keep) -> None:
    """Zero the *outputs* of dropped channels in place: every tensor whose first dimension
    belongs to a group gets its dropped rows zeroed (conv filters, BN affine). In eval mode the
    network then computes exactly what the physically pruned subnet computes."""
    keep = _checked_keep(spec, keep)
    full = _full_widths(spec)
    for key, axes in tensor_axes(spec).items():
        if not axes or axes[0] is None or key.endswith(("running_mean", "running_var")):
            continue
        t = state[key]
        mask = torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
        mask[kept_positions(axes[0], keep, full).to(t.device)] = False
        t[mask] = 0
