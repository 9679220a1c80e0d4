"""Shared pieces of the GPU kit: results rows, run metadata, CIFAR-10 parts, sizes, budgets.

Nothing here imports rayprune at module level, so ``prepare`` runs without torch's CUDA build
and ``run`` can report a failed rayprune import as a clean preflight line.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_KIT = REPO / ".gpukit"  # git-ignored: data parts, wheels, meta (carried); state (stays there)
DEFAULT_CIFAR = REPO.parent / "shared" / "data" / "cifar-10-batches-py"
LIMIT_BYTES = 64 * 1024 * 1024  # what one device command may carry: tree + carried paths
COMMON = "common"  # .gpukit/common: wheels/ + meta.json, carried by every command
STATE = "state"  # .gpukit/state: written on the device (calibration), never carried

# Which CIFAR-10 batches travel with which command. Part 3 holds data_batch_5 *and* the test
# set, so command 3 can still run stage B on 10k training images if a cold machine lost parts 1-2.
PARTS: dict[int, list[str]] = {
    1: ["data_batch_1", "data_batch_2"],
    2: ["data_batch_3", "data_batch_4"],
    3: ["data_batch_5", "test_batch"],
}
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
FORMAT = "gdiff2d-xz-v1"
IMAGE_SHAPE = (3, 32, 32)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------


class Clock:
    """Wall-clock budget of one command (``budget_s`` None: unlimited)."""

    def __init__(self, budget_s: float | None, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats become None (and are reported as such), tensors become lists."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    if hasattr(v, "tolist"):  # torch tensors
        return _clean(v.tolist())
    if isinstance(v, Path):
        return str(v)
    return v


class Results:
    """Appends one JSON object per line to ``out/results.jsonl`` and flushes it to disk at once,
    so a command cut off at its time limit still returns every finished row."""

    def __init__(self, out_dir: str | Path, meta: dict[str, Any], echo: bool = True) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.jsonl"
        self.meta = meta
        self.echo = echo
        self.rows: list[dict[str, Any]] = []

    def add(self, stage: str, **row: Any) -> dict[str, Any]:
        full = _clean({"stage": stage, **row, "time": now(), **{f"meta_{k}": v for k, v in self.meta.items()}})
        with self.path.open("a") as f:
            f.write(json.dumps(full, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(full)
        if self.echo:
            short = {k: v for k, v in full.items() if not k.startswith("meta_") and k not in ("spec", "time")}
            print(f"[row] {json.dumps(short, sort_keys=True)[:600]}", flush=True)
        return full


def read_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------------------------
# Metadata: which code ran where
# --------------------------------------------------------------------------------------------


def code_hash(repo: Path = REPO) -> str:
    """sha256 over rayprune/**/*.py and bench/**/*.py (path + content): identifies the code that
    ran even when uncommitted edits travelled with the working tree."""
    h = hashlib.sha256()
    files = sorted(p for d in ("rayprune", "bench") for p in (repo / d).rglob("*.py") if "__pycache__" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(repo)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_info(repo: Path = REPO) -> dict[str, Any]:
    """SHA and dirty flag from git, or {} where there is no git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "rayprune", "bench"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        ).stdout.strip()
        return {"git_sha": sha, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {}


def run_meta(kit: Path, device: str, command: str) -> dict[str, Any]:
    """What every row records: git SHA (live, else the one prepare wrote), code hash, torch, GPU."""
    import torch

    meta: dict[str, Any] = {
        "command": command,
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "code_hash": code_hash(),
        # "fp32" convs/matmuls run as TF32 on Ampere+ when these are on (torch's defaults)
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    live = git_info()
    prepared = {}
    meta_file = kit / COMMON / "meta.json"
    if meta_file.is_file():
        prepared = json.loads(meta_file.read_text())
    # The device's .git is the session's *starting* checkout with today's tree copied over it, so a
    # dirty live SHA is stale there; prepare's SHA is right whenever the code that runs is the
    # code prepare hashed (seen on the first H200 run: live 25b41af, dirty, for code at c3448f1).
    prepared_matches = bool(prepared) and prepared.get("code_hash") == meta["code_hash"]
    if live and not (live.get("git_dirty") and prepared_matches):
        meta.update(live, git_source="live")
    elif prepared:
        meta.update(git_sha=prepared.get("git_sha"), git_dirty=prepared.get("git_dirty"), git_source="prepare")
    else:
        meta.update(git_sha=None, git_source="unknown")
    if prepared:
        meta["prepared_code_hash"] = prepared.get("code_hash")
        meta["prepared_at"] = prepared.get("prepared_at")
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
        meta["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        meta["gpu"] = None
    return meta


# --------------------------------------------------------------------------------------------
# CIFAR-10 parts: colour-decorrelated 2-D differences, xz-compressed (lossless, ~56 % of raw)
# --------------------------------------------------------------------------------------------


def _encode(x: np.ndarray) -> bytes:
    """uint8 [N, 3, 32, 32] -> residual bytes: G, R-G, B-G (mod 256), each differenced along
    width then height (mod 256). Inverse: :func:`_decode`."""
    xi = x.astype(np.int16)
    c = np.stack([xi[:, 1], xi[:, 0] - xi[:, 1], xi[:, 2] - xi[:, 1]], axis=1)
    r = np.diff(np.diff(c, axis=3, prepend=0), axis=2, prepend=0)
    return np.ascontiguousarray(r.astype(np.uint8)).tobytes()


def _decode(buf: bytes, n: int) -> np.ndarray:
    r = np.frombuffer(buf, dtype=np.uint8).reshape(n, *IMAGE_SHAPE)
    c = np.cumsum(np.cumsum(r, axis=2, dtype=np.uint8), axis=3, dtype=np.uint8)  # wraps mod 256
    g = c[:, 0]
    return np.stack([c[:, 1] + g, g, c[:, 2] + g], axis=1)  # uint8 arithmetic wraps mod 256


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the official CIFAR-10 release through rayprune's restricted reader (nothing in
    the file can run code; shapes, dtype and labels are checked)."""
    from rayprune.engine.data import read_cifar_batch  # here, not at module level (see above)

    return read_cifar_batch(Path(path))


def pack_batch(src: Path, dst_dir: Path, preset: int = 6) -> dict[str, Any]:
    """Write ``<name>.img.xz`` + ``<name>.labels.npy`` for one pickle batch; returns its manifest entry."""
    x, y = read_cifar_pickle(src)
    dst_dir.mkdir(parents=True, exist_ok=True)
    blob = lzma.compress(_encode(x), format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2, "preset": preset}])
    tmp = dst_dir / f".{src.name}.img.xz.tmp"
    tmp.write_bytes(blob)
    os.replace(tmp, dst_dir / f"{src.name}.img.xz")
    np.save(dst_dir / f"{src.name}.labels.npy", y.astype(np.uint8))
    return {
        "n": len(x),
        "sha256": sha256(x.tobytes()),
        "labels_sha256": sha256(y.astype(np.int64).tobytes()),
        "format": FORMAT,
        "bytes": len(blob),
        "source_bytes": src.stat().st_size,
    }


def unpack_batch(part_dir: Path, name: str, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    x = _decode(lzma.decompress((part_dir / f"{name}.img.xz").read_bytes()), entry["n"])
    y = np.load(part_dir / f"{name}.labels.npy").astype(np.int64)
    if sha256(np.ascontiguousarray(x).tobytes()) != entry["sha256"] or sha256(y.tobytes()) != entry["labels_sha256"]:
        raise ValueError(f"{part_dir / name}: checksum mismatch after unpacking (a damaged or partial copy)")
    return x, y


def load_parts(kit: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every batch found in ``kit/part*/`` (checked against its manifest), by batch name."""
    out = {}
    for part_dir in sorted(kit.glob("part*")):
        manifest = part_dir / "manifest.json"
        if not manifest.is_file():
            continue
        for name, entry in json.loads(manifest.read_text())["batches"].items():
            if (part_dir / f"{name}.img.xz").is_file():
                out[name] = unpack_batch(part_dir, name, entry)
    return out


def cifar_from_parts(kit: Path, need_test: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """(train, test, info) engine Datasets from whatever parts are on this machine.

    ``info`` says which batches were found (``partial`` when fewer than five training batches).
    Raises FileNotFoundError when no training batch (or, with ``need_test``, no test batch) is here.
    """
    import torch

    from rayprune.engine.data import CIFAR10_MEAN, CIFAR10_STD, Dataset

    t0 = time.perf_counter()
    batches = load_parts(kit)
    train_names = [b for b in TRAIN_BATCHES if b in batches]
    if not train_names:
        raise FileNotFoundError(
            f"no CIFAR-10 training batch under {kit}/part*/ (run bench/gpu/prepare.py here and "
            f"carry the parts as bench/gpu/README.md says)"
        )
    if need_test and "test_batch" not in batches:
        raise FileNotFoundError(f"test_batch not under {kit}/part*/ (it travels in part 3)")
    x = torch.from_numpy(np.concatenate([batches[b][0] for b in train_names]))
    y = torch.from_numpy(np.concatenate([batches[b][1] for b in train_names]))
    train = Dataset(x, y, 10, CIFAR10_MEAN, CIFAR10_STD, "cifar10")
    test = None
    if "test_batch" in batches:
        tx, ty = batches["test_batch"]
        test = Dataset(torch.from_numpy(tx), torch.from_numpy(ty), 10, CIFAR10_MEAN, CIFAR10_STD, "cifar10")
    info = {
        "train_batches": train_names,
        "train_n": len(train),
        "test_n": len(test) if test is not None else 0,
        "partial": len(train_names) < len(TRAIN_BATCHES),
        "unpack_s": round(time.perf_counter() - t0, 2),
    }
    return train, test, info


# --------------------------------------------------------------------------------------------
# Sizes: what one device command sends
# --------------------------------------------------------------------------------------------


def path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def tree_bytes(repo: Path = REPO) -> int:
    """The working tree that travels: tracked files plus untracked files git does not ignore
    (``git ls-files`` + ``git ls-files --others --exclude-standard``), plus ``shared/`` if present."""
    total = 0
    for args in (["ls-files", "-z"], ["ls-files", "-z", "--others", "--exclude-standard"]):
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True, timeout=60).stdout
        for rel in out.decode().split("\0"):
            p = repo / rel
            if rel and p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    if (repo / "shared").is_dir():
        total += path_bytes(repo / "shared")
    return total


def mib(n: int | float) -> str:
    return f"{n / 2**20:.1f} MiB"


def python_exe() -> str:
    return sys.executable or "python3"
