"""Plain-text tables for people (the CLI's summaries, the front tables)."""

from __future__ import annotations

from collections.abc import Sequence


def aligned(rows: Sequence[Sequence[str]], left: int = 0) -> str:
    """``rows`` (the first one is the header) as right-aligned columns two spaces apart; the
    first ``left`` columns are left-aligned (names read better that way)."""
    widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=False)))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
