"""Tensor axes indexed by more than one channel group (a traced family's concatenations and
flattens), written as plain strings so that :data:`~rayprune.models.base.Axes` stays JSON-like.

An axis is ``None`` (not pruned), a group name (the axis *is* the group), or segments joined by
``+`` in axis order: ``NAME`` (the group's channels), ``NAME*R`` (each channel repeated ``R``
times in a row, as a flatten of a ``C x H x W`` map lays out ``C`` channels of ``R = H*W``
values) and ``=N`` (``N`` positions no group prunes). ``"a+b*4+=3"`` is ``cat(a, flatten(b),
fixed)``. Group names never contain ``+``, ``*`` or ``=``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Segment = tuple[str | None, int]  # (group, repeat) or (None, fixed positions)


def segments(axis: str) -> list[Segment]:
    """The segments of an axis expression, in axis order."""
    out: list[Segment] = []
    for part in axis.split("+"):
        if part.startswith("="):
            out.append((None, int(part[1:])))
        else:
            name, _, repeat = part.partition("*")
            out.append((name, int(repeat) if repeat else 1))
    return out


def join(parts: list[Segment]) -> str | None:
    """The expression of ``parts`` (``None`` when no group indexes the axis)."""
    if all(group is None for group, _ in parts):
        return None
    return "+".join(f"={n}" if g is None else (g if n == 1 else f"{g}*{n}") for g, n in parts)


def groups_in(axis: str | None) -> list[str]:
    """The channel groups an axis depends on."""
    return [] if axis is None else [g for g, _ in segments(axis) if g is not None]


def axis_width(axis: str, widths: Mapping[str, int]) -> int:
    """The length of the axis when each group has ``widths[group]`` channels."""
    return sum(n if g is None else widths[g] * n for g, n in segments(axis))


def kept_positions(axis: str, keep: Mapping[str, torch.Tensor], full_widths: Mapping[str, int]) -> torch.Tensor:
    """The positions of the full axis that a subnet keeping ``keep`` channels keeps, in order."""
    if "+" not in axis and "*" not in axis:
        return keep[axis]
    pieces, offset = [], 0
    for group, n in segments(axis):
        if group is None:
            pieces.append(torch.arange(offset, offset + n, device="cpu"))
            offset += n
            continue
        idx = keep[group].cpu()
        pieces.append(offset + (idx[:, None] * n + torch.arange(n, device="cpu")).flatten())
        offset += full_widths[group] * n
    return torch.cat(pieces)
