"""The sweep's one cache of final-phase trainings.

Every finished final-phase training of a sweep -- a trial's own final (``recipes.search``), an
end-of-sweep fine-tune (``recipes.finetune``), the unpruned baseline -- is kept here, keyed by
``(cell, spec hash, recipe hash, KD weight)``, under the sweep's storage path
(``<experiment>/final_cache/<cell>/<spec hash>-<recipe hash>-kd<weight>/``: spec.json,
weights.pt, metrics.json holding the finalized ``SubnetRecord``). A trial or task whose subnet is
already there reuses the entry instead of training it again; so do a resumed sweep's
fine-tunes, which makes the end-of-sweep fine-tune incremental.

Trials and tasks both read and write it (an entry appears atomically, whole or not at all);
it is not tracking data: the driver stays the only writer to MLflow and ``subnets.parquet``.
Two trials finishing the same subnet at the same moment may both train it; the second write
replaces the first with an equivalent entry.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch

from ..grid import CellKey
from ..models import subnet_io
from ..runner import save_subnet
from .storage import filesystem, is_uri

CACHE_DIR = "final_cache"
BASELINE_CELL = "baseline"


def cache_key(cell: CellKey | str, spec_hash: str, recipe_hash: str, kd_weight: float) -> str:
    """The cache key (a relative path) of one final-phase training in ``cell`` (a grid cell's
    key, or :data:`BASELINE_CELL`)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(cell))
    return f"{safe}/{spec_hash}-{recipe_hash}-kd{kd_weight:g}"


class FinalCache:
    """Final-phase trainings under ``root`` (a local/NFS path or a pyarrow URI such as s3://...)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    @classmethod
    def of_experiment(cls, experiment_path: str) -> FinalCache:
        return cls(f"{experiment_path.rstrip('/')}/{CACHE_DIR}")

    def _fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        return filesystem(self.root)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def __contains__(self, key: str) -> bool:
        fs, root = self._fs()
        return fs.get_file_info(f"{root}/{key}/metrics.json").type == pyarrow.fs.FileType.File

    def get(self, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """``(record dict, state_dict)`` of a cached training, or None."""
        if key not in self:
            return None
        fs, root = self._fs()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp)
            for name in (subnet_io.SPEC_FILE, subnet_io.METRICS_FILE, subnet_io.WEIGHTS_FILE):
                with fs.open_input_stream(f"{root}/{key}/{name}") as f:
                    (local / name).write_bytes(f.readall())
            saved = subnet_io.load(local)  # the one reader of a saved subnet (weights_only, no pickles)
        return saved.record, saved.state_dict

    def put(self, key: str, record: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> str:
        """Store a training (atomically on local paths); returns its location."""
        if not is_uri(self.root):
            target = Path(self.root).resolve() / key
            save_subnet(target, record["spec"], state_dict, record)
            return str(target)
        fs, root = self._fs()
        with tempfile.TemporaryDirectory() as tmp:
            local = save_subnet(Path(tmp) / "entry", record["spec"], state_dict, record)
            fs.create_dir(f"{root}/{key}", recursive=True)
            # metrics.json last: an entry counts as present once it exists
            for name in ("spec.json", "weights.pt", "metrics.json"):
                with fs.open_output_stream(f"{root}/{key}/{name}") as f:
                    f.write((local / name).read_bytes())
        return self.path(key)

    def __iter__(self) -> Iterator[str]:
        """Every complete entry's key, sorted (as :meth:`keys`)."""
        return iter(self.keys())

    def keys(self) -> list[str]:
        """Every complete entry's key, sorted."""
        fs, root = self._fs()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
        suffix = "/metrics.json"
        return sorted(
            i.path[len(root) + 1 : -len(suffix)]
            for i in infos
            if i.type == pyarrow.fs.FileType.File and i.path.endswith(suffix) and "/." not in i.path
        )


__all__ = ["BASELINE_CELL", "CACHE_DIR", "FinalCache", "cache_key"]
