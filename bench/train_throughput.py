"""Training throughput of the engine against a plain PyTorch reference loop (issue 3).

Trains ResNet-56 on CIFAR-10 for a fixed number of steps, in one process, two ways:

* engine: ``rayprune.engine.fit`` (device-resident data, on-device crop/flip, channels_last,
  bf16 autocast on CUDA, optional ``torch.compile``);
* reference: torchvision ``CIFAR10`` + ``DataLoader`` workers with RandomCrop(32, 4) /
  RandomHorizontalFlip / ToTensor / Normalize, fp32, NCHW, ``loss.item()`` every step (the usual
  research-script loop).

Same model, batch size and SGD settings. Both get untimed warm-up steps first; the one-time
copy of CIFAR-10 to the device is excluded (a sweep shares it across trials). Prints images/s for
both, the ratio, and the achieved TFLOP/s from analytic MACs (training ~ 3 x forward MACs x 2).

    python bench/train_throughput.py --steps 50 --batch-size 128 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rayprune import models
from rayprune.engine import TrainConfig, fit, make_optimizer, resolve_device
from rayprune.engine.data import CIFAR10_MEAN, CIFAR10_STD, DataError, default_data_dirs, load_cifar

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = "cifar_resnet:56"


def find_cifar10(data_dir: str | None) -> Path:
    """The directory holding ``cifar-10-batches-py``: --data-dir, $RAYPRUNE_DATA_DIR, cache, ../shared/data."""
    roots = default_data_dirs(data_dir) + ([] if data_dir else [SHARED_DATA])
    for root in roots:
        if (root / "cifar-10-batches-py").is_dir():
            return root
    raise DataError(f"cifar-10-batches-py not found in {', '.join(map(str, roots))}; pass --data-dir DIR")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_engine(root: Path, cfg: TrainConfig, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of ``fit`` over exactly ``steps`` steps (one epoch of a ``steps * batch`` subset)."""
    train, _ = load_cifar(root / "cifar-10-batches-py", "cifar10")
    n = cfg.batch_size
    warm_set, timed_set = train.subset(range(warmup * n)), train.subset(range(warmup * n, (warmup + steps) * n))
    torch.manual_seed(0)
    net = models.build(models.full_spec(MODEL, num_classes=10))
    for ds in (warm_set, timed_set):
        ds.on_device(device)  # the one-time upload, shared by every trial of a sweep: not timed
    fit(net, warm_set, cfg, device=device, progress=False)
    sync(device)
    start = time.perf_counter()
    fit(net, timed_set, cfg, device=device, progress=False)
    sync(device)
    return steps * n / (time.perf_counter() - start)


def reference_loader(root: Path, batch_size: int, device: torch.device) -> torch.utils.data.DataLoader:
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    data = torchvision.datasets.CIFAR10(str(root), train=True, transform=tf, download=False)
    workers = min(8, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=True)


def bench_reference(root: Path, cfg: TrainConfig, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of the plain loop over ``steps`` steps after ``warmup`` untimed ones."""
    loader = reference_loader(root, cfg.batch_size, device)
    torch.manual_seed(0)
    net = models.build(models.full_spec(MODEL, num_classes=10)).to(device).train()
    opt = make_optimizer(net, cfg)
    batches = iter(loader)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # what a logging research loop does every step
    sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="timed training steps per loop")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--data-dir", default=None, help="directory containing cifar-10-batches-py")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        root = find_cifar10(args.data_dir)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, schedule="constant", compile=args.compile)
    macs = models.macs(models.full_spec(MODEL, num_classes=10), 32)
    print(f"{MODEL} ({macs / 1e6:.2f} M MACs/image), CIFAR-10 from {root}, device {device}, "
          f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup_steps} warm-up, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rates = {}
    for name, bench in (("engine", bench_engine), ("reference", bench_reference)):
        rates[name] = bench(root, cfg, args.steps, args.warmup_steps, device)
        tflops = rates[name] * 3 * 2 * macs / 1e12  # forward + 2x backward, 2 FLOPs per MAC
        print(f"{name:>9}: {rates[name]:10.1f} img/s  {tflops:8.4f} TFLOP/s achieved", flush=True)
    print(f"    ratio: {rates['engine'] / rates['reference']:.2f}x (engine / reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
