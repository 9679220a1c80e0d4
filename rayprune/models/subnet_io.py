"""The saved-subnet format: the one place that writes and reads a subnet folder.

A saved subnet is a folder with

* ``spec.json``    -- the architecture (a rayprune spec),
* ``weights.pt``   -- a plain ``state_dict`` (read with :func:`rayprune.engine.checkpoint.safe_load`,
  ``weights_only=True``: nothing but tensors is unpickled),
* ``metrics.json`` -- optional, one schema: a subnet record (``spec``, ``macs``, ``params``,
  ``metrics`` {name: number}, ``method``, ``step``, ``source``) plus ``input_size``, the input
  resolution the subnet was trained and measured at.

Folders written before the input size was saved (and teachers' old flat ``metrics.json``) still
load: the input size then falls back to the one the caller knows the subnet was trained at (its
run's or sweep's, else its dataset's), else to the spec's ``input_size`` hint, else
:meth:`SavedSubnet.require_input_size` raises a clear error. It is never the family default.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.checkpoint import UnreadableFileError, safe_load
from ..errors import RaypruneError
from . import build, load_spec, save_spec
from .base import Spec, SpecError

SPEC_FILE, WEIGHTS_FILE, METRICS_FILE = "spec.json", "weights.pt", "metrics.json"
REQUIRED_FILES = (SPEC_FILE, WEIGHTS_FILE)

__all__ = [
    "METRICS_FILE",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "NotASubnetError",
    "SavedSubnet",
    "is_saved",
    "load",
    "save",
    "staged_folder",
    "write_files",
]


# A FileNotFoundError too: callers catch a folder that lacks a file of a saved subnet as one.
class NotASubnetError(RaypruneError, FileNotFoundError):
    """A folder that is not a saved subnet (spec.json or weights.pt missing)."""


@dataclass(frozen=True)
class SavedSubnet:
    """What :func:`load` reads: the spec, its weights, the saved record and the input size
    (``None`` when neither saved nor derivable: see :meth:`require_input_size`)."""

    path: Path
    spec: Spec
    state_dict: dict[str, torch.Tensor]
    record: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """The numeric metrics (a record's ``metrics``, or an old flat file's numbers)."""
        nested = self.record.get("metrics")
        saved = nested if isinstance(nested, dict) else self.record
        return {
            k: v
            for k, v in saved.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "input_size"
        }

    def require_input_size(self) -> int:
        """The input size; :class:`SpecError` when it is unknown (an old folder, no hint, no default)."""
        if self.input_size is None:
            raise SpecError(
                f"saved subnet {str(self.path)!r} records no input size and its spec has no "
                "'input_size' hint; give the input size (or the dataset) explicitly"
            )
        return self.input_size

    def build(self) -> nn.Module:
        """The subnet as an ``nn.Module`` with its weights loaded strictly (train mode, CPU)."""
        net = build(self.spec, seed=0)  # seeded: the init is overwritten, the global RNG untouched
        try:
            net.load_state_dict(self.state_dict)
        except (RuntimeError, TypeError, AttributeError, KeyError, ValueError):
            expected, got = set(net.state_dict()), set(self.state_dict)
            differ = sorted(expected ^ got)
            detail = f"first differing key: {differ[0]!r}" if differ else "a tensor has the wrong shape or type"
            raise SpecError(
                f"{str(self.path / WEIGHTS_FILE)!r} does not fit {str(self.path / SPEC_FILE)!r} "
                f"({detail}); save the subnet again or point at another folder"
            ) from None
        return net


def is_saved(path: str | Path) -> bool:
    """Whether ``path`` holds a complete saved subnet (its weights are written last)."""
    return all((Path(path) / name).is_file() for name in REQUIRED_FILES)


def save(
    out_dir: str | Path,
    spec: Spec,
    state_dict: dict[str, torch.Tensor],
    record: dict[str, Any] | None = None,
    *,
    input_size: int | None = None,
) -> Path:
    """Write ``out_dir`` atomically (a half-written folder never appears): spec.json,
    weights.pt and, when ``record`` or ``input_size`` is given, metrics.json (``record`` with
    ``input_size`` added). An existing ``out_dir`` is replaced."""
    out_dir = Path(out_dir)
    with staged_folder(out_dir) as tmp:
        write_files(tmp, spec, state_dict, record, input_size=input_size)
    return out_dir


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A new temporary folder next to ``out_dir`` to write into. When the block ends it replaces
    ``out_dir`` (and whatever that held); on an error it is removed instead, so a half-written
    folder never appears."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_files(
    folder: Path,
    spec: Spec,
    state_dict: dict[str, torch.Tensor],
    record: dict[str, Any] | None = None,
    *,
    input_size: int | None = None,
) -> None:
    """The files of :func:`save`, written into the existing ``folder`` (not atomically)."""
    save_spec(spec, folder / SPEC_FILE)
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, folder / WEIGHTS_FILE)
    if record is not None or input_size is not None:
        saved = {**(record or {}), **({"input_size": int(input_size)} if input_size is not None else {})}
        (folder / METRICS_FILE).write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")


def load(path: str | Path, *, default_input_size: int | None = None) -> SavedSubnet:
    """Read a saved subnet folder without unpickling anything.

    The input size is the saved one, else ``default_input_size`` (the size its run or sweep
    trained at, else its dataset's, when the caller knows it), else the spec's ``input_size``
    hint, else ``None``. The caller's size comes before the hint because runs train at their
    own or their dataset's size, never at the hint.

    Raises:
        NotASubnetError: spec.json or weights.pt is missing.
        SpecError: spec.json is not a valid spec.
    """
    path = Path(path)
    fix = "give a folder written by `rayprune teacher` or `rayprune run` (its final/)"
    if not path.exists():
        raise NotASubnetError(f"saved subnet folder {str(path)!r} does not exist; {fix}")
    if not path.is_dir():
        raise NotASubnetError(f"{str(path)!r} is a file, not a saved subnet folder; {fix}")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise NotASubnetError(
            f"{str(path)!r} is not a saved subnet: it lacks {', '.join(missing)} "
            f"(a saved subnet holds {' and '.join(REQUIRED_FILES)}); {fix}"
        )
    spec = load_spec(path / SPEC_FILE)
    state = safe_load(
        path / WEIGHTS_FILE,
        "weights",
        "save the subnet again (rayprune teacher/run write it) or point at another folder",
    )
    record = _read_record(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else {}
    size = record.pop("input_size", None) or default_input_size or spec.get("input_size")
    return SavedSubnet(path=path, spec=spec, state_dict=state, record=record, input_size=size)


def _read_record(path: Path) -> dict[str, Any]:
    """A saved subnet's metrics.json; :class:`UnreadableFileError` when it is not a JSON object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not text"
    else:
        if isinstance(record, dict):
            return record
        reason = f"it holds a {type(record).__name__}"
    raise UnreadableFileError(
        f"cannot read {str(path)!r}: not a JSON object ({reason})",
        fix="save the subnet again (rayprune teacher/run write it) or point at another folder",
    )
