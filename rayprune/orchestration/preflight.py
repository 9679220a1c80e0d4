"""What a sweep checks before Ray starts and before anything is written.

Each check turns a bad input that would otherwise fail late (after Ray started, after the
tracking database was created, or after minutes of Ray's connection retries) into one
:class:`PreflightError` line within seconds:

* :func:`check_storage_path`: a local storage path that is a regular file, or under one, or in
  a folder this user cannot write; an object-storage URI whose bucket is missing or unreachable;
* :func:`check_ray_address`: ``--address``: the GCS port must accept a TCP connection within a
  few seconds (``auto`` is resolved the way Ray resolves it: ``RAY_ADDRESS``, else the address
  file of the last ``ray start`` on this machine);
* :func:`check_local_resources`: a local Ray cannot grow, so a trial asking for more GPUs or
  CPUs than this machine has is refused before Ray starts.

No MLflow imports; Ray is imported only to resolve ``--address auto``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

from ..errors import RaypruneError
from .storage import is_uri

#: Seconds to wait for the Ray GCS port to accept a connection.
CONNECT_TIMEOUT_S = 3.0


class PreflightError(RaypruneError):
    """A sweep input that cannot work; one line naming it and the fix (exit status 2)."""


def check_storage_path(storage_path: str) -> None:
    """A local storage path must be a directory, or creatable in a writable directory; an
    object-storage URI must name a reachable bucket (see :func:`check_object_storage`)."""
    if is_uri(storage_path):
        check_object_storage(storage_path)
        return
    path = Path(storage_path)
    where = f"storage path {path} (storage_path / --storage-path)"
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{where} is a regular file, not a directory; pass a directory (it is created if missing)")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PreflightError(
            f"{where}: {ancestor} is a regular file, so the folder cannot be created; pass another directory"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PreflightError(f"{where}: {ancestor} is not writable by this user; pass a directory you can write")


OBJECT_STORAGE_FIX = (
    "check the bucket name and the credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
    "AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 for an S3-compatible server; for GCS: "
    "GOOGLE_APPLICATION_CREDENTIALS)"
)


def check_object_storage(uri: str) -> None:
    """The bucket of an object-storage ``storage_path`` must exist and answer. Otherwise the
    sweep would fail only after Ray started and the tracking store was written, on pyarrow's
    first access there (and pyarrow does not create buckets)."""
    import pyarrow.fs

    where = f"storage path {uri} (storage_path / --storage-path)"
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError: an unknown scheme, a bad URI
        raise PreflightError(
            f"{where}: {_first_line(e)}; use a local folder or an s3://BUCKET/PREFIX or gs://BUCKET/PREFIX URI"
        ) from None
    bucket = path.split("/", 1)[0]
    try:
        kind = fs.get_file_info(bucket).type
    except OSError as e:  # unreachable endpoint, bad credentials, access denied
        raise PreflightError(f"{where}: cannot reach it ({_first_line(e)}); {OBJECT_STORAGE_FIX}") from None
    if kind != pyarrow.fs.FileType.Directory:
        raise PreflightError(
            f"{where}: bucket {bucket!r} does not exist (rayprune does not create buckets); create "
            f"it or {OBJECT_STORAGE_FIX}"
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].rstrip(". ")


def resolve_ray_address(address: str) -> tuple[str, str]:
    """``(shown, probed)``: the ``host:port`` of the GCS that ``ray.init(address=address)`` would
    join as the user would recognise it (``auto``: from ``RAY_ADDRESS`` or the last ``ray start``
    on this machine), and as Ray connects to it (a loopback host becomes this node's IP)."""
    text = address.strip()
    if text.startswith("ray://"):  # Ray Client: the client server's port
        hostport = text[len("ray://") :].split("/", 1)[0]
        return hostport, hostport
    from ray._private import services

    if text == "auto":
        try:
            text = services.get_ray_address_from_environment("auto", None)
        except ConnectionError:
            text = ""
        if not text:
            raise PreflightError(
                "--address auto: no running Ray cluster found on this machine (no RAY_ADDRESS and "
                "no address file of a `ray start`); start one with `ray start --head`, pass "
                "--address HOST:PORT, or drop --address to run on a local Ray"
            )
    if _split(text) is None:
        raise PreflightError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or auto")
    try:
        probed = services.canonicalize_bootstrap_address(text) or text
    except Exception:
        probed = text
    return text, probed


def _split(hostport: str) -> tuple[str, int] | None:
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_ray_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when nothing accepts a connection at the Ray cluster's
    address (``ray.init`` would retry for minutes). ``None`` and ``local`` start a local Ray."""
    if address is None or address.strip() == "local":
        return
    shown, probed = resolve_ray_address(address)
    parsed = _split(probed) or _split(shown)
    assert parsed is not None  # resolve_ray_address refuses an address that does not parse
    fix = "start it with `ray start --head` or check the address (or drop --address to run on a local Ray)"
    try:
        socket.create_connection(parsed, timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e) or type(e).__name__)
        where = shown if shown == address.strip() else f"{shown} (--address {address})"
        raise PreflightError(
            f"cannot join the Ray cluster at {where}: nothing accepted a connection within "
            f"{timeout:g} s ({reason}); {fix}"
        ) from None


def local_gpus() -> int:
    """GPUs a local Ray would see: the CUDA devices torch sees (``CUDA_VISIBLE_DEVICES`` applies)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_local_resources(cpu: float, gpu: float, num_cpus: int | None = None) -> None:
    """A trial's ``resources`` against what a local Ray would have (``num_cpus``: --num-cpus)."""
    have = {
        "CPU": float(num_cpus if num_cpus is not None else local_cpus()),
        "GPU": float(local_gpus()) if gpu else 0.0,
    }
    check_trial_fits(cpu, gpu, have, "this machine", cpu_note=" (--num-cpus)" if num_cpus is not None else "")


def check_trial_fits(
    cpu: float,
    gpu: float,
    have: Mapping[str, float],
    where: str,
    error: type[Exception] = PreflightError,
    cpu_note: str = "",
) -> None:
    """Raise ``error`` when one trial asks for more CPUs or GPUs than ``have`` (what ``where``,
    a local machine or its Ray, has): a local Ray cannot grow, so such a trial would wait forever."""
    for key, name, need in (("CPU", "cpu", cpu), ("GPU", "gpu", gpu)):
        if need > have.get(key, 0.0):
            note = cpu_note if key == "CPU" else ""
            raise error(
                f"resources.{name}: each trial asks for {need:g} {key}s but {where} has "
                f"{have.get(key, 0.0):g}{note}; lower resources.{name} or join a cluster with --address auto"
            )


__all__ = [
    "CONNECT_TIMEOUT_S",
    "PreflightError",
    "check_local_resources",
    "check_object_storage",
    "check_ray_address",
    "check_storage_path",
    "check_trial_fits",
    "resolve_ray_address",
]
