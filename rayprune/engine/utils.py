"""Small helpers shared by the engine: seeding, device resolution and a model's BN layers."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError

__all__ = ["BN_TYPES", "bn_layers", "derive_seed", "resolve_device", "seed_everything"]

#: torch's batch-norm layers, by their public names.
BN_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every batch-norm layer of ``model`` (with running statistics to re-estimate), in module order."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def _seed_word(part: int | str) -> int:
    if isinstance(part, str):  # a stable hash (unlike hash(), which is salted per process)
        return int.from_bytes(hashlib.sha256(part.encode()).digest()[:8], "little")
    return int(part) % 2**64


def derive_seed(*parts: int | str) -> int:
    """A well-mixed 63-bit seed from integers and/or names, e.g. ``(seed, epoch)`` or ``(seed, "pretrain")``.

    Mixing with NumPy's SeedSequence keeps nearby inputs (seed 0 epoch 1, seed 1 epoch 0)
    from giving correlated streams, which ``seed + epoch`` would. Stable across processes.
    """
    # SeedSequence wants 32-bit words; the leading count keeps (1, 0) apart from (1,) (trailing zeros).
    words = [len(parts)] + [w for p in parts for w in divmod(_seed_word(p), 2**32)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise check the name is usable.

    Raises:
        InputError: an unknown device, or a CUDA device this machine does not have.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"unknown device {str(name)!r}; use cpu, cuda or cuda:N (or leave it unset: cuda when available, else cpu)"
        ) from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {str(name)!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(name)!r} requested but CUDA is not available here; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {str(name)!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def image_layout(device: torch.device) -> torch.memory_format:
    """The memory format of image batches and conv weights on ``device``: ``channels_last`` on
    accelerators, plain NCHW on the CPU.

    Why not NHWC on the CPU: oneDNN's backward-weights kernel for a strided 1x1 conv whose input
    has fewer channels than its vector block (8 with AVX2, 16 with AVX-512) writes past its
    workspace when the input is NHWC (uxlfoundation/oneDNN#6035, open; torch 2.15 ships it). A
    pruned net reaches such widths easily (a ResNet's downsample shortcut, a traced net's strided
    1x1 branch): one thread corrupts the heap, two hang or give wrong gradients. NCHW takes
    oneDNN's blocked path, which is correct.
    """
    return torch.contiguous_format if device.type == "cpu" else torch.channels_last


def as_image_batch(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[N, C, H, W]``, any strides) in :func:`image_layout` for its device."""
    return x.contiguous(memory_format=image_layout(x.device))
