"""Tensor axes indexed by more than one channel group (a traced family's concatenations and
flattens), written as plain strings so that :data:`~rayprune.models.base.Axes` stays JSON-like.

An axis is ``None`` (not pruned), a group name (the axis *is* the group), or segments joined by
``+`` in axis order: ``NAME`` (the group's channels), ``NAME*R`` (each channel repeated ``R``
times in a row, as a flatten of a ``C x H x W`` map lays out ``C`` channels of ``R = H*W``
values) and ``=N`` (``N`` positions no group prunes). ``"a+b*4+=3"`` is ``cat(a, flatten(b),
fixed)``. Group names never contain ``+``, ``*``, ``=`` or ``/``.

A grouped conv's weight ``[C_out, C_in / G, kh, kw]`` reads, for an output channel of block
``k``, the channels of input block ``k`` only: its dimension 1 is ``AXIS/G`` (:func:`blocked`),
the offsets within a block of ``AXIS``'s channels, block chosen by dimension 0. Its kept
positions depend on the row, so it is sliced by :func:`block_columns` rather than
:func:`kept_positions`.
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


def blocked(axis: str) -> tuple[str, int] | None:
    """``(AXIS, G)`` for a grouped conv's per-block input axis ``AXIS/G``, else None."""
    inner, slash, groups = axis.rpartition("/")
    return (inner, int(groups)) if slash else None


def groups_in(axis: str | None) -> list[str]:
    """The channel groups an axis depends on."""
    if axis is None:
        return []
    inner = blocked(axis)
    return [g for g, _ in segments(inner[0] if inner else axis) if g is not None]


def axis_width(axis: str, widths: Mapping[str, int]) -> int:
    """The length of the axis when each group has ``widths[group]`` channels."""
    inner = blocked(axis)
    if inner is not None:
        return axis_width(inner[0], widths) // inner[1]
    return sum(n if g is None else widths[g] * n for g, n in segments(axis))


def block_columns(
    axis: str, keep: Mapping[str, torch.Tensor], full_widths: Mapping[str, int], rows: torch.Tensor, rows_full: int
) -> torch.Tensor:
    """For a blocked axis ``AXIS/G`` (dimension 1 of a grouped conv's weight): per kept row
    (``rows``, full indices along dimension 0 of ``rows_full``), the in-block offsets of the
    input channels it keeps, ``[len(rows), kept / G]``. Needs the same count kept in every block."""
    inner, groups = blocked(axis) or (axis, 1)
    kept = kept_positions(inner, keep, full_widths).cpu()
    starts = torch.arange(groups, device="cpu")[:, None] * (axis_width(inner, full_widths) // groups)
    per_block = kept.view(groups, -1) - starts
    return per_block[rows.cpu() // (rows_full // groups)]


def kept_positions(axis: str, keep: Mapping[str, torch.Tensor], full_widths: Mapping[str, int]) -> torch.Tensor:
    """The positions of the full axis that a subnet keeping ``keep`` channels keeps, in order
    (ascending). Not for a blocked axis (:func:`block_columns`)."""
    assert blocked(axis) is None, f"blocked axis {axis!r}: its positions depend on the row"
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
