"""Ship the user's network code to the Ray workers of a sweep (``runtime_env`` ``py_modules``).

A sweep of ``FILE.py:FACTORY`` or ``package.module:FACTORY`` runs trials on workers that import
the factory. On a cluster those may be other nodes, where the file's path does not exist or the
package is not installed. The driver therefore hands ``ray.init`` a ``runtime_env`` that uploads
the code once (Ray keeps it in the cluster's object store by content hash) and unpacks it on
every node before a worker starts:

* a file: a copy in a folder named by :func:`~rayprune.models.sources.shipped_folder`, which
  the workers' source resolver prefers to the path (:func:`~rayprune.models.sources.located`);
  the file should be self-contained (its own imports installed on the nodes);
* a package that is not installed in site-packages (found on ``PYTHONPATH`` or in the current
  folder): its top-level package folder, importable by its name on the workers.

``torchvision:NAME``, the shipped families and installed packages need nothing.
"""

from __future__ import annotations

import importlib.util
import shutil
import site
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..models import is_source
from ..models.sources import TORCHVISION, shipped_folder


@contextmanager
def user_code_env(model: str | None) -> Iterator[dict[str, Any]]:
    """The ``runtime_env`` that ships ``model``'s code (``{}`` when nothing needs shipping),
    valid inside the ``with`` block (a file's staged copy is removed after it)."""
    if model is None or not is_source(model) or model.startswith(TORCHVISION):
        yield {}
        return
    head = model.rpartition(":")[0]
    if not head.endswith(".py"):
        package = _local_package(head.partition(".")[0])
        yield {"py_modules": [str(package)]} if package is not None else {}
        return
    with tempfile.TemporaryDirectory(prefix="rayprune-ship-") as staging:
        folder = Path(staging) / shipped_folder(head)
        folder.mkdir()
        (folder / "__init__.py").touch()
        shutil.copy2(head, folder / Path(head).name)
        yield {"py_modules": [str(folder)]}


def _local_package(name: str) -> Path | None:
    """The folder of top-level package ``name`` when it is neither installed nor rayprune itself."""
    if name == "rayprune":
        return None
    found = importlib.util.find_spec(name)
    if found is None or found.origin is None or not found.submodule_search_locations:
        return None  # not importable here (a trial says so), or a single-file module
    folder = Path(found.origin).resolve().parent
    installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")} | set(site.getsitepackages())
    if any(folder.is_relative_to(Path(p).resolve()) for p in installed):
        return None
    return folder
