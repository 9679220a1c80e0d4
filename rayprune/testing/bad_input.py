"""Checking that a command refuses bad input the way every rayprune command must.

:func:`refused` runs ``rayprune ARGV`` in-process and asserts the promise of the CLI: exit
status 2, exactly one ``rayprune: error: ...`` line on stderr (no traceback, no internal class
names, never the advice ``weights_only=False``), and nothing under a folder written or changed.
It takes pytest's ``capsys`` (anything with ``readouterr()``), so a plugin's tests can use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: What must never reach a user's terminal in an error line.
LEAKS = ("Traceback", "weights_only=False", "TrialConfig", "Hparams", "Budget", "Value error,")


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and folder under ``root``: size, modification time and (small files) content."""
    out = {}
    for p in sorted(root.rglob("*")):
        small = p.is_file() and p.stat().st_size < 1 << 20
        out[str(p.relative_to(root))] = (
            p.stat().st_size if p.is_file() else -1,
            p.stat().st_mtime_ns,
            p.read_bytes() if small else b"",
        )
    return out


def refused(capsys: Any, root: Path, argv: list[str], *needles: str) -> str:
    """Run ``rayprune argv``: exit 2, one ``rayprune: error:`` line holding ``needles``, nothing
    under ``root`` written or changed. Returns the line."""
    from ..cli import main

    before = snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("rayprune: error: "), (argv, err)
    for needle in needles:
        assert needle in lines[0], (argv, needle, lines[0])
    for leak in LEAKS:
        assert leak not in err, (argv, leak, err)
    assert "sqlalchemy" not in err.lower(), (argv, err)  # a database error told as a traceback
    assert snapshot(root) == before, argv
    return lines[0]
