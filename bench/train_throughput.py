"""Training throughput of the engine against a plain PyTorch reference loop (issues 3 and 12).

Trains ResNet-56 on CIFAR-10 two ways in one process and compares them **interleaved**:

* engine: ``rayprune.engine.fit`` (device-resident data, on-device crop/flip, channels_last and
  bf16 autocast on CUDA, optional ``torch.compile``);
* reference: a ``DataLoader`` with workers over the same images and torchvision's
  RandomCrop(32, 4) / RandomHorizontalFlip / ToTensor / Normalize per PIL image (what
  ``torchvision.datasets.CIFAR10`` does), ``loss.item()`` every step (the usual research-script loop).

Same model, batch size and SGD settings. Every arm gets one untimed warm-up chunk, then the arms
take turns (A B C D, D C B A, ...) for ``--rounds`` chunks of ``--steps`` steps each, so drift and
background load hit them alike; the printed ratios are medians of the per-round ratios. The
one-time copy of CIFAR-10 to the device is excluded (a sweep shares it across trials). The loops
live in ``bench/gpu/throughput.py`` (the GPU kit's stage A uses the same code).

    python bench/train_throughput.py --data-dir ../shared/data --steps 20 --rounds 5 --device cpu
    python bench/train_throughput.py --steps 40 --rounds 7 --device cuda --compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.gpu` from the repo root

from bench.gpu import throughput
from rayprune import models
from rayprune.engine import resolve_device
from rayprune.engine.data import DataError, default_data_dirs, load_cifar, synthetic_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def find_cifar10(data_dir: str | None) -> Path:
    """The directory holding ``cifar-10-batches-py``: --data-dir, $RAYPRUNE_DATA_DIR, cache, ../shared/data."""
    roots = default_data_dirs(data_dir) + ([] if data_dir else [SHARED_DATA])
    for root in roots:
        if (root / "cifar-10-batches-py").is_dir():
            return root
    raise DataError(f"cifar-10-batches-py not found in {', '.join(map(str, roots))}; pass --data-dir DIR")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed training steps per chunk")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one chunk per arm each)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--data-dir", default=None, help="directory containing cifar-10-batches-py")
    p.add_argument("--synthetic", action="store_true", help="synthetic 32x32 data instead of CIFAR-10 (tests)")
    p.add_argument("--model", default=throughput.MODEL, help="FAMILY:VARIANT (default %(default)s)")
    p.add_argument("--compile", action="store_true", help="also compare torch.compile'd loops (bf16 + channels_last)")
    p.add_argument("--compile-budget-s", type=float, default=300.0)
    p.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default min(8, cpus))")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        if args.synthetic:
            train, _ = synthetic_dataset(n_train=max(512, args.steps * args.batch_size), n_test=16, seed=0)
            source = "synthetic data"
        else:
            root = find_cifar10(args.data_dir)
            train, _ = load_cifar(root / "cifar-10-batches-py", "cifar10")
            source = f"CIFAR-10 from {root}"
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    macs = models.macs(models.full_spec(args.model, num_classes=10), 32)
    print(
        f"{args.model} ({macs / 1e6:.2f} M MACs/image), {source}, device {device}, batch {args.batch_size}, "
        f"{args.rounds} interleaved rounds of {args.steps} steps per arm, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads",
        flush=True,
    )
    rows = []

    def emit(**row: object) -> None:
        rows.append(row)
        if row.get("kind") == "arm" and "img_s" in row:
            print(
                f"[{row['phase']}] {row['arm']:>28}: {row['img_s']:9.1f} img/s  {row['tflops']:8.4f} TFLOP/s  "
                f"epoch {row['epoch_s']:7.1f} s"
                + (f"  compile {row['compile_s']:.0f} s" if "compile_s" in row else ""),
                flush=True,
            )
        elif row.get("kind") == "ratio":
            print(
                f"[{row['phase']}] ratio {row['ratio']}: median {row['median_ratio']:.2f}x "
                f"(min {row['min_ratio']:.2f}, max {row['max_ratio']:.2f}, {row['rounds']} rounds)",
                flush=True,
            )
        elif row.get("error") or row.get("kind") == "skipped":
            print(f"[{row.get('phase')}] {row.get('arm', '')}: {row.get('error') or row.get('reason')}", flush=True)

    throughput.stage_a(
        train,
        device,
        emit,
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        rounds=args.rounds,
        compile_settings=("bf16_cl_compile",) if args.compile else (),
        compile_budget_s=args.compile_budget_s,
        workers=args.workers,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
