"""Tiled channel groups: the channels that feed or leave a grouped conv.

A conv with ``G`` groups splits its input and its output channels into ``G`` equal contiguous
blocks, and output block ``k`` reads input block ``k`` only. Pruned, it keeps ``G`` groups, so a
channel group it touches must keep the *same number* of channels in every block: its width is
a multiple of ``G`` (the group's ``divisor``) and its channels fall into ``tiles`` blocks (the
lcm of the ``G`` of every grouped conv it meets). A group with ``tiles == 1`` is an ordinary one,
and every helper here then reduces to the plain rule (the first ``n`` of an order). Indices live on
the CPU (also inside a ``torch.device`` context: a meta build slices its state with them).

Every method that chooses which channels a group keeps goes through :func:`per_block_prefix`
(an order of preference, best first) or :func:`completed_removals` (a removal order, first
removed first), so that each block keeps its own best ``width / tiles`` channels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .base import SpecError


def per_block_prefix(order: torch.Tensor, n: int, width: int, tiles: int) -> torch.Tensor:
    """The kept indices (ascending) of a group keeping ``n`` channels: the first ``n / tiles``
    channels of each block in ``order`` (the channels, most wanted first). With one tile it is
    ``order[:n]``."""
    if tiles == 1:
        return order[:n].sort().values
    quota, size = n // tiles, width // tiles
    taken = [0] * tiles
    kept = []
    for index in order.tolist():
        block = index // size
        if taken[block] < quota:
            taken[block] += 1
            kept.append(index)
    return torch.tensor(sorted(kept), dtype=torch.long, device="cpu")


def first_channels(width: int, n: int, tiles: int) -> torch.Tensor:
    """The first ``n / tiles`` channels of each block (the first ``n`` with one tile)."""
    return per_block_prefix(torch.arange(width, device="cpu"), n, width, tiles)


def completed_removals(removed: Iterable[int], width: int, tiles: int) -> list[int]:
    """The channels of ``removed`` (in removal order) that actually go: each block gives up its
    first ``m`` removed channels, where ``m`` is the fewest any block has in ``removed``. So the
    group's width stays a multiple of ``tiles`` and only falls as more channels are removed."""
    removed = list(removed)
    if tiles == 1:
        return removed
    size = width // tiles
    per_block: list[list[int]] = [[] for _ in range(tiles)]
    for index in removed:
        per_block[index // size].append(index)
    m = min(len(b) for b in per_block)
    return [index for block in per_block for index in block[:m]]


def interleaved_from_last(width: int, tiles: int, floor: int) -> list[int]:
    """Channels in removal order when only the width matters: the last channel of every block in
    turn, then the one before it, down to ``floor / tiles`` per block (``floor`` with one tile)."""
    size = width // tiles
    return [b * size + j for j in reversed(range(floor // tiles, size)) for b in range(tiles)]


def round_up(width: int, tiles: int) -> int:
    """``width`` raised to the next multiple of ``tiles``."""
    return -(-width // tiles) * tiles


def check_width(name: str, width: int, tiles: int) -> None:
    """Refuse a width that a tiled group cannot take (not a multiple of its divisor)."""
    if width % tiles:
        raise SpecError(
            f"channel group {name!r}: width {width} is not a multiple of its divisor {tiles} "
            f"(the group count of the grouped conv it meets); use a multiple of {tiles}"
        )


def check_keep(name: str, kept: torch.Tensor, width: int, tiles: int) -> None:
    """Refuse kept indices that do not keep the same count in every block of a tiled group."""
    if tiles == 1:
        return
    counts = torch.bincount(kept // (width // tiles), minlength=tiles).tolist()
    if len(set(counts)) != 1:
        raise SpecError(
            f"channel group {name!r}: keeps {counts} channels in its {tiles} blocks of {width // tiles}; "
            f"a grouped conv needs the same count in every block (divisor {tiles})"
        )
