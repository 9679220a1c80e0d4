"""Atomic, pickle-free checkpoints and RNG capture/restore, and the one torch file loader.

Checkpoints hold only tensors and plain Python containers so that :func:`safe_load` can use
``torch.load(weights_only=True)``: loading never executes code from the file. Every torch file
rayprune reads (run state, training checkpoints, saved-subnet and teacher weights, the final
cache) goes through :func:`safe_load`, which turns any failure (a pickled module or code, random
bytes, a truncated file) into one :class:`UnreadableFileError` line naming the file and the fix.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..errors import RaypruneError

__all__ = ["MissingFileError", "UnreadableFileError", "atomic_save", "capture_rng", "load", "restore_rng", "safe_load"]


# A ValueError too: loaders of user files (a sweep's teacher check) catch a refused file as one.
class UnreadableFileError(RaypruneError, ValueError):
    """A torch file rayprune reads is refused: damaged, truncated, or holding more than tensors
    and plain containers. The message names the file and the fix (never ``weights_only=False``)."""


# A FileNotFoundError too: loaders of user files (a sweep's teacher check) catch a missing one as one.
class MissingFileError(RaypruneError, FileNotFoundError):
    """A file rayprune was asked to read does not exist; the message names it and the fix."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace`` it into place.

    A crash mid-write leaves the previous file intact (never a truncated one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_load(
    path: str | Path,
    what: str = "checkpoint",
    fix: str | None = None,
    *,
    map_location: str | torch.device = "cpu",
    expect: type | None = dict,
    hint: str | None = None,
) -> Any:
    """``torch.load(path, weights_only=True)``; any failure becomes one :class:`UnreadableFileError`.

    Args:
        what: what the file is, for the message ("run state", "teacher weights", ...).
        fix: what the user should do (default: delete the file and re-run).
        expect: the type the file must hold (``None``: anything weights_only allows).
        hint: the key of the command line's wording of ``fix`` (:class:`~rayprune.errors.RaypruneError`).

    Raises:
        MissingFileError: ``path`` does not exist.
        UnreadableFileError: ``path`` is a folder, damaged, truncated, not a torch file, holds
            pickled objects other than tensors and plain containers (no code from it runs), or
            does not hold an ``expect``.
    """
    path = Path(path)
    fix = fix or "delete it and re-run"
    if not path.exists():
        raise MissingFileError(f"{what} {str(path)!r} does not exist", fix=fix, hint=hint)
    if not path.is_file():
        raise UnreadableFileError(f"{what} {str(path)!r} is not a file", fix=fix, hint=hint)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: not the user's concern
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # Never repeat torch's text: it advises weights_only=False, which would run a hostile file.
        reason = (
            "it holds pickled Python objects (a module or code), which rayprune never loads"
            if "GLOBAL" in str(e)
            else "it is damaged, truncated or not a torch file"
        )
        raise UnreadableFileError(f"cannot read {what} {str(path)!r}: {reason}", fix=fix, hint=hint) from None
    if expect is not None and not isinstance(obj, expect):
        raise UnreadableFileError(
            f"cannot read {what} {str(path)!r}: it holds a {type(obj).__name__}, not what rayprune writes",
            fix=fix,
            hint=hint,
        )
    return obj


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by :func:`atomic_save` (:func:`safe_load`, ``weights_only=True``)."""
    return safe_load(path, "checkpoint", map_location=map_location, expect=None)


def capture_rng(torch_only: bool = False) -> dict[str, Any]:
    """The state of the global RNGs: torch CPU, torch CUDA (when initialised) and, unless
    ``torch_only``, Python's ``random`` and NumPy's global generator."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if not torch_only:
        version, mt_state, gauss = random.getstate()
        np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # the global MT19937
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
        state["python"] = [version, list(mt_state), gauss]
        # NumPy's key array is stored as a tensor: weights_only loading refuses raw ndarrays.
        state["numpy"] = [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured (only the generators it contains)."""
    if "python" in state:
        version, mt_state, gauss = state["python"]
        random.setstate((version, tuple(mt_state), gauss))
    if "numpy" in state:
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
        np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
