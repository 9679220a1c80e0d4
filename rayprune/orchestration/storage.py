"""Paths on the sweep's storage: a local/NFS directory or a pyarrow filesystem URI (``s3://...``).

One place for joining, testing and fetching such paths, so the driver, the teacher and baseline
tasks and the trials agree on what a storage path means.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs


def is_uri(path: str) -> bool:
    """Whether ``path`` names object storage (any pyarrow filesystem URI) rather than a local path."""
    return "://" in path


def join(storage: str, name: str) -> str:
    """``storage/name`` for a local path or a URI."""
    return f"{storage.rstrip('/')}/{name}" if is_uri(storage) else str(Path(storage) / name)


def filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem and path of a local path or a ``s3://...``-style URI."""
    return pyarrow.fs.FileSystem.from_uri(path if is_uri(path) else str(Path(path).resolve()))


def file_exists(path: str) -> bool:
    """Whether ``path`` (local or URI) is an existing file."""
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pyarrow.fs.FileType.File


def upload_dir(local: Path, target: str) -> None:
    """Copy the local folder ``local`` to ``target`` (a URI)."""
    fs, path = pyarrow.fs.FileSystem.from_uri(target)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


def localize(path_or_uri: str, dest: Path) -> str:
    """A local path for a saved subnet dir: local/NFS paths as they are, ``s3://...`` (any
    pyarrow filesystem URI) downloaded to ``dest`` first."""
    if not is_uri(path_or_uri):
        return path_or_uri
    fs, path = pyarrow.fs.FileSystem.from_uri(path_or_uri)
    dest.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(dest), source_filesystem=fs)
    return str(dest)
