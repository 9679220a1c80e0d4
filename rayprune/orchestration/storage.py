"""Paths on the sweep's storage: a local/NFS directory or a pyarrow filesystem URI (``s3://...``).

One place for joining, testing and fetching such paths, so the driver, the teacher and baseline
tasks and the trials agree on what a storage path means.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow
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


def tune_storage(storage: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Tune's ``RunConfig`` and ``Tuner.restore``.

    A local (or NFS) path gets :class:`AtomicLocalFiles`: Tune rewrites its experiment state by
    truncating and copying, so a driver killed mid-copy left an empty ``experiment_state-*.json``
    and the sweep could not be resumed. Object storage already writes whole objects or none, so a
    URI keeps the filesystem Tune infers."""
    if is_uri(storage):
        return storage, None
    return os.path.abspath(storage), pyarrow.fs.PyFileSystem(AtomicLocalFiles())


class AtomicLocalFiles(pyarrow.fs.FileSystemHandler):
    """The local filesystem, except that a file written through it appears whole or not at all:
    it is written beside its place under a hidden temporary name and renamed over it when closed
    (``os.replace``, atomic on POSIX filesystems, NFS included). A process killed while writing
    leaves the previous file and a stray ``.*.tmp``, which no reader of Tune's state matches."""

    def __init__(self) -> None:
        self._fs = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalFiles)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __reduce__(self) -> tuple[type[AtomicLocalFiles], tuple[()]]:
        # pickled into Tune's experiment and shipped to the trial actors
        return AtomicLocalFiles, ()

    def get_type_name(self) -> str:
        return "rayprune-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self._fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return self._fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("rayprune will not delete the contents of the root directory")

    def delete_file(self, path: str) -> None:
        self._fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self._fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        return self._fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pyarrow.NativeFile:
        return self._fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_ReplaceOnClose(Path(path)), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pyarrow.NativeFile:
        return self._fs.open_append_stream(path)


class _ReplaceOnClose(io.RawIOBase):
    """A binary file written at a temporary name beside ``path`` and renamed to ``path`` on close."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self.closed:
            return
        self._file.close()
        os.chmod(self._tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; a plain write would not
        os.replace(self._tmp, self._path)
        super().close()


def _process_umask() -> int:
    # Read once, at import: os.umask can only be read by setting it, which would race with
    # other threads creating files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()
