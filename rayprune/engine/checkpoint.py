"""Atomic, pickle-free checkpoints and RNG capture/restore.

Checkpoints hold only tensors and plain Python containers so that :func:`load` can use
``torch.load(weights_only=True)``: loading never executes code from the file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_save", "capture_rng", "load", "restore_rng"]


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


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by :func:`atomic_save` (``weights_only=True``)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def capture_rng(torch_only: bool = False) -> dict[str, Any]:
    """The state of the global RNGs: torch CPU, torch CUDA (when initialised) and, unless
    ``torch_only``, Python's ``random`` and NumPy's global generator."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if not torch_only:
        version, mt_state, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state["python"] = [version, list(mt_state), gauss]
        # NumPy's key array is stored as a tensor: weights_only loading refuses raw ndarrays.
        state["numpy"] = [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                          float(np_gauss)]
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
