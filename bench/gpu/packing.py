"""Packing: how many training processes one GPU holds before the aggregate stops growing.

Each worker is a separate Python process (as a Ray trial is) that trains a ResNet-56 subnet
(uniform 0.5 of the MACs, ``avgpool_conv``) with the captured engine step on synthetic
device-resident images: it builds and warms up (the capture included), waits for a common
start time so that the timed windows overlap, trains for ``seconds``, and writes its images/s
and peak GPU memory (allocated and reserved by torch; the CUDA context, ~0.5 GiB, comes on top).
The row for N processes gives the aggregate images/s, its ratio to one process in the same mode
(``speedup_vs_1``) and the memory per process; the best N suggests a trial's ``resources.gpu``
(1 / N).

    python3 bench/gpu/packing.py --worker ...   # one worker (the stage starts these itself)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.gpu` and `rayprune` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MODEL = "cifar_resnet:56"
TARGET = 0.5
PROCESSES = (1, 4, 8)
WORKER_GRACE_S = 240.0


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.gpu.stage_c import uniform_spec
    from rayprune import models
    from rayprune.engine.captured import GraphStep, fused_optimizer
    from rayprune.engine.data import Dataset, make_loader
    from rayprune.engine.train import TrainConfig, make_scheduler

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.input_size
    gen = torch.Generator().manual_seed(args.rank)
    n = args.batch_size * args.steps
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    data = Dataset(x, torch.arange(n) % 10, 10, (0.5,) * 3, (0.25,) * 3, "synthetic")
    full = models.full_spec(args.model, num_classes=10, shortcut="avgpool_conv")
    spec = uniform_spec(full, args.target, input_size=size) if args.target < 1 else full
    net = models.build(spec, seed=args.rank).to(device).to(memory_format=torch.channels_last)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, schedule="constant", amp=True)
    loader = make_loader(data, args.batch_size, train=True, device=device, seed=args.rank)
    groups = [{"params": list(net.parameters()), "weight_decay": cfg.weight_decay}]
    opt = fused_optimizer(groups, cfg, device)
    step = GraphStep(net, loader, opt, make_scheduler(opt, cfg, len(loader)), cfg, teacher=None, capture=args.capture)
    epochs = 0

    def epoch() -> None:
        nonlocal epochs
        loader.set_epoch(epochs)
        step.train_epoch()
        epochs += 1

    for _ in range(2):  # the warm-up steps and the capture
        epoch()
    time.sleep(max(0.0, args.start_at - time.time()))
    t0, images = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        epoch()  # train_epoch's loss read synchronises: the clock sees finished work
        images += len(loader) * args.batch_size
    secs = time.perf_counter() - t0
    cuda = device.type == "cuda"
    return {
        "rank": args.rank,
        "img_s": images / secs,
        "seconds": secs,
        "late_start_s": max(0.0, time.time() - secs - args.start_at),  # > 0: still warming up at the start
        "max_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "max_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
        "macs": models.macs(spec, size),
    }


def _launch(count: int, opts: dict[str, Any], warmup_s: float, out_dir: Path) -> list[dict[str, Any]]:
    start_at = time.time() + warmup_s
    procs = []
    for rank in range(count):
        out = out_dir / f"packing_{count}_{rank}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rank", str(rank), "--out", str(out)]
        cmd += ["--start-at", str(start_at)] + [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
        procs.append((subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}), out))
    # Generous: a loaded machine imports torch slowly; the bound only stops a hung worker.
    deadline = time.monotonic() + warmup_s + 4 * opts["seconds"] + WORKER_GRACE_S
    rows = []
    try:
        for proc, out in procs:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0 or not out.is_file():
                raise RuntimeError(f"packing worker {out.stem} exited with {code}")
            rows.append(json.loads(out.read_text()))
    finally:
        for proc, _ in procs:  # a failed or hung worker must not keep the GPU busy for the next stage
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rows


def stage_packing(
    device: str,
    emit: Callable[..., Any],
    out_dir: Path,
    *,
    processes: tuple[int, ...] = PROCESSES,
    model: str = MODEL,
    batch_size: int = 128,
    steps: int = 20,
    seconds: float = 10.0,
    warmup_s: float = 25.0,
    input_size: int = 32,
    threads: int = 1,
    left: Callable[[], float] = lambda: float("inf"),
) -> None:
    """One row per process count: aggregate images/s, ratio to one process, memory per process."""
    opts = dict(
        device=device,
        model=model,
        target=TARGET,
        batch_size=batch_size,
        steps=steps,
        seconds=seconds,
        input_size=input_size,
        threads=threads,
        capture=int(device.startswith("cuda")),
    )
    single = None
    for count in processes:
        if left() < warmup_s + seconds + 15:
            emit(kind="skipped", processes=count, reason=f"stage time left {left():.0f} s")
            continue
        rows = _launch(count, opts, warmup_s, out_dir)
        aggregate = sum(r["img_s"] for r in rows)
        single = aggregate if count == 1 else single
        reserved = [r["max_reserved_mib"] for r in rows if r["max_reserved_mib"] is not None]
        emit(
            kind="packing",
            processes=count,
            model=model,
            target=TARGET,
            batch_size=batch_size,
            captured=bool(opts["capture"]),
            aggregate_img_s=aggregate,
            per_process_img_s=[r["img_s"] for r in rows],
            late_start_s=max(r["late_start_s"] for r in rows),
            speedup_vs_1=aggregate / single if single else None,
            max_reserved_mib_per_process=max(reserved) if reserved else None,
            max_allocated_mib_per_process=max((r["max_allocated_mib"] or 0) for r in rows) if reserved else None,
            resources_gpu=round(1 / count, 4),
            macs_per_image=rows[0]["macs"],
        )


def _parse_worker(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one packing worker")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--start-at", type=float, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--target", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--input-size", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--capture", type=int, required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    worker_args = _parse_worker(sys.argv[1:])
    result = _worker(worker_args)
    tmp = worker_args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(worker_args.out)
