"""Prepare the GPU kit here (CPU machine): data parts, wheels, metadata, and the 64 MiB check.

    .venv/bin/python bench/gpu/prepare.py              # pack (cached), download wheels, check, print the plan
    .venv/bin/python bench/gpu/prepare.py --check-only # just before the device commands: refresh the
                                                        # recorded git SHA / code hash, re-check sizes

Writes, under the git-ignored ``.gpukit/``:

* ``part1``, ``part2``, ``part3``: CIFAR-10 in three parts (see ``common.PARTS``), each batch as
  losslessly transformed, xz-compressed uint8 images + labels + a manifest with checksums.
* ``common/wheels``: pydantic and its dependencies, and onnxruntime (stage C), for CPython 3.12
  x86-64 (the GPU machine has no pydantic); ``common/meta.json``: the git SHA, dirty flag and
  code hash at prepare time (``.git`` does not travel).

Then, for each of the three device commands, it adds the working tree's size (``git ls-files`` +
untracked-not-ignored) to the sizes of the paths that command carries and refuses (exit 2, one
line) when any total exceeds the limit. It prints every command's carry list and command line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.gpu` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu.common import (
    COMMON,
    DEFAULT_CIFAR,
    DEFAULT_KIT,
    FORMAT,
    LIMIT_BYTES,
    PARTS,
    REPO,
    code_hash,
    git_info,
    mib,
    now,
    pack_batch,
    path_bytes,
    tree_bytes,
)

# Packages the GPU machine lacks (pydantic; onnxruntime for stage C's CPU latency) or may hold in
# too old a version for it.
WHEEL_PACKAGES = [
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "onnxruntime",
    "flatbuffers",
    "protobuf",
]
WHEEL_FALLBACK = {
    "onnxruntime": "1.31.1",
    "flatbuffers": "25.12.19",
    "protobuf": "7.36.2",
    "pydantic": "2.14.3",
    "pydantic-core": "2.50.4",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
}
PIP_PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
]

# Timeouts for the device tool (seconds) and what each command does; run.py holds the budgets.
COMMANDS = {
    1: {"timeout_s": 300, "does": "install wheels, preflight, stage A captured phase (parts 1), calibration"},
    2: {"timeout_s": 240, "does": "packing (synthetic device data), stage C on fixed specs (no data needed)"},
    3: {"timeout_s": 480, "does": "reassemble CIFAR-10, stage B (teacher + 5 arms), stage C on stage B's nets"},
}


class PrepareError(Exception):
    pass


def wheel_versions() -> dict[str, str]:
    """The versions this repo's venv runs (so the device runs what the tests ran)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in WHEEL_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = WHEEL_FALLBACK[name]
    return out


def ensure_wheels(wheel_dir: Path) -> list[Path]:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    versions = wheel_versions()
    wanted = []
    for name, ver in versions.items():
        stem = name.replace("-", "_")
        if not list(wheel_dir.glob(f"{stem}-{ver}-*.whl")):
            wanted.append(f"{name}=={ver}")
    for stale in wheel_dir.glob("*.whl"):  # keep one version of each: two stop the whole install
        dist, ver = stale.name.split("-")[:2]
        if versions.get(dist.replace("_", "-").lower()) not in (None, ver):
            stale.unlink()
    if wanted:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", str(wheel_dir), *wanted]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            raise PrepareError(f"pip download of {' '.join(wanted)} failed: {last}")
    return sorted(wheel_dir.glob("*.whl"))


def _pack_job(args: tuple[str, str, int]) -> tuple[str, dict]:
    src, dst, preset = args
    return Path(src).name, pack_batch(Path(src), Path(dst), preset)


def pack_parts(cifar: Path, kit: Path, preset: int, jobs: int) -> None:
    """Pack every batch whose cached copy is missing or stale (manifest keyed by source size and format)."""
    todo = []
    manifests = {}
    for part, names in PARTS.items():
        part_dir = kit / f"part{part}"
        mf = part_dir / "manifest.json"
        manifest = json.loads(mf.read_text()) if mf.is_file() else {"batches": {}}
        manifests[part] = manifest
        for name in names:
            src = cifar / name
            if not src.is_file():
                raise PrepareError(f"{src} is missing (need the python-pickle CIFAR-10 folder; pass --cifar-dir)")
            entry = manifest["batches"].get(name)
            fresh = (
                entry
                and entry.get("format") == FORMAT
                and entry.get("source_bytes") == src.stat().st_size
                and (part_dir / f"{name}.img.xz").is_file()
                and (part_dir / f"{name}.labels.npy").is_file()
            )
            if not fresh:
                todo.append((part, str(src), str(part_dir), preset))
    if todo:
        print(
            f"packing {len(todo)} batch(es) with {jobs} process(es) (xz preset {preset}; ~30 s per batch per core)...",
            flush=True,
        )
        with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(_pack_job, [t[1:] for t in todo]))
        for (part, *_), (name, entry) in zip(todo, results, strict=True):
            manifests[part]["batches"][name] = entry
    for part, manifest in manifests.items():
        # Drop entries of batches that no longer belong to this part (PARTS changed).
        manifest["batches"] = {k: v for k, v in manifest["batches"].items() if k in PARTS[part]}
        (kit / f"part{part}").mkdir(parents=True, exist_ok=True)
        (kit / f"part{part}" / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def check_ignored(kit: Path) -> None:
    """The kit must be git-ignored inside the repo: it must never be committed or sent as tree."""
    try:
        rel = kit.resolve().relative_to(REPO)
    except ValueError:
        return  # outside the repo (tests): nothing travels from there as tree
    res = subprocess.run(["git", "check-ignore", "-q", str(rel / "probe")], cwd=REPO)
    if res.returncode != 0:
        raise PrepareError(f"{rel}/ is not git-ignored; add '/{rel}/' to .gitignore first")


def carry_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def plan(kit: Path, tree: int, limit: int) -> list[dict]:
    rows = []
    for cmd in COMMANDS:
        carry = [kit / COMMON, kit / f"part{cmd}"]
        sizes = {carry_name(p): path_bytes(p) for p in carry}
        total = tree + sum(sizes.values())
        rows.append(
            {
                "command": cmd,
                "carry": list(sizes),
                "sizes": sizes,
                "tree": tree,
                "total": total,
                "limit": limit,
                "ok": total <= limit,
                **COMMANDS[cmd],
            }
        )
    return rows


def device_command(cmd: int) -> str:
    return f"bash bench/gpu/device.sh {cmd}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar-dir", type=Path, default=DEFAULT_CIFAR, help="the cifar-10-batches-py folder")
    p.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="where parts, wheels and meta go (git-ignored)")
    p.add_argument("--preset", type=int, default=6, help="xz preset (0 fast .. 9 small)")
    p.add_argument("--jobs", type=int, default=min(3, os.cpu_count() or 1), help="packing processes")
    p.add_argument("--no-wheels", action="store_true", help="do not download wheels (tests)")
    p.add_argument("--check-only", action="store_true", help="only re-check the sizes of what is already packed")
    p.add_argument("--limit-bytes", type=int, default=LIMIT_BYTES, help="per-command limit (default 64 MiB)")
    p.add_argument("--tree-bytes", type=int, default=None, help="override the measured tree size (tests)")
    p.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    args = p.parse_args(argv)
    kit = args.kit.resolve()
    try:
        check_ignored(kit)
        if not args.check_only:
            pack_parts(args.cifar_dir, kit, args.preset, args.jobs)
            if not args.no_wheels:
                ensure_wheels(kit / COMMON / "wheels")
        # Always refreshed (cheap): the SHA and code hash the device rows will name.
        (kit / COMMON).mkdir(parents=True, exist_ok=True)
        meta = {
            **git_info(),
            "code_hash": code_hash(),
            "prepared_at": now(),
            "wheels": sorted(w.name for w in (kit / COMMON / "wheels").glob("*.whl")),
        }
        (kit / COMMON / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        for part in PARTS:
            if not (kit / f"part{part}" / "manifest.json").is_file():
                raise PrepareError(f"{kit}/part{part} is not packed yet; run prepare without --check-only")
        tree = args.tree_bytes if args.tree_bytes is not None else tree_bytes()
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    rows = plan(kit, tree, args.limit_bytes)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    meta_file = kit / COMMON / "meta.json"
    sha = json.loads(meta_file.read_text()).get("git_sha") if meta_file.is_file() else None
    print(
        f"tree (tracked + untracked-not-ignored): {mib(tree)}; limit per command {mib(args.limit_bytes)}; "
        f"git SHA recorded for the device: {sha}"
    )
    for r in rows:
        parts = " + ".join(f"{k} {mib(v)}" for k, v in r["sizes"].items())
        print(
            f"command {r['command']}: total {mib(r['total'])} = tree {mib(r['tree'])} + {parts}; "
            f"margin {mib(r['limit'] - r['total'])}; {'OK' if r['ok'] else 'OVER'}"
        )
        print(f"  carry = {json.dumps(r['carry'])}   timeout_s = {r['timeout_s']}   ({r['does']})")
        print(f"  command: {device_command(r['command'])}")
    over = [r for r in rows if not r["ok"]]
    if over:
        r = over[0]
        print(
            f"prepare: error: command {r['command']} would send {mib(r['total'])} (tree {mib(r['tree'])} + "
            f"{' + '.join(f'{k} {mib(v)}' for k, v in r['sizes'].items())}) > {mib(r['limit'])} limit",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
