"""Robust accuracy: top-1 under a fixed, seeded suite of image corruptions.

This suite defines the "robust" axis of rayprune's Pareto fronts, so it is fixed: changing it
makes results incomparable. In the spirit of CIFAR-10-C (Hendrycks & Dietterich, 2019), each
corruption is applied at one fixed severity (CIFAR-10-C's severity 3 parameters) to the image
in [0, 1] *before* normalisation, on the device:

============== ===================================================================== ===========
name           operation                                                             parameter
============== ===================================================================== ===========
gaussian_noise ``x + N(0, s^2)``                                                     s = 0.08
shot_noise     ``Poisson(x * r) / r``                                                r = 100
gaussian_blur  separable Gaussian, reflect padding; sigma in px scaled by H/32,      sigma = 0.7
               at least 0.5 px
contrast       ``(x - mean_img) * c + mean_img`` (per image, over all channels)      c = 0.4
brightness     ``x + b``                                                             b = 0.15
pixelate       area-downsample to ``round(H * f)`` px (at most H - 1), nearest-up    f = 0.85
============== ===================================================================== ===========

Every result is clipped to [0, 1]. Noise comes from a generator on the evaluation device seeded
by ``(seed, corruption index)``: the same seed, device and batch size give identical numbers.
``robust_top1`` is the mean top-1 over the six corruptions.

No corruption may be a no-op at any input size, or it would count clean accuracy as robust.
Two rules keep them real on tiny inputs (e.g. the 8x8 digits): the blur's sigma, scaled by H/32,
never drops below 0.5 px (at 8 px the scaled 0.175 px kernel put > 99.9 % of its weight on the
centre pixel, so the "blurred" test set equalled the clean one), and pixelate always loses at
least one pixel per side. Inputs of 23 px and more (CIFAR, ImageNet) are unaffected by both.

:data:`ROBUST_SUITE_VERSION` names this exact suite. Finalized records store it
(``source["robust_suite"]``): robust accuracies of different suite versions are not comparable.
Version 1 was the suite without the two tiny-input rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Loader, make_loader
from .train import autocast
from .utils import derive_seed, resolve_device

__all__ = ["CORRUPTIONS", "ROBUST_SUITE_VERSION", "corrupt", "robust_accuracy"]

ROBUST_SUITE_VERSION = 2
MIN_BLUR_SIGMA_PX = 0.5

Corruption = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def gaussian_noise(x: torch.Tensor, gen: torch.Generator, std: float = 0.08) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def shot_noise(x: torch.Tensor, gen: torch.Generator, rate: float = 100.0) -> torch.Tensor:
    return torch.poisson(x * rate, generator=gen) / rate


def _gaussian_kernel(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, gen: torch.Generator, sigma: float = 0.7) -> torch.Tensor:
    sigma = max(sigma * x.shape[-1] / 32, MIN_BLUR_SIGMA_PX)  # relative to the image size, never a no-op
    r = max(1, min(math.ceil(3 * sigma), x.shape[-1] - 1))  # reflect padding must stay inside the image
    k = _gaussian_kernel(sigma, r, x.device).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def contrast(x: torch.Tensor, gen: torch.Generator, factor: float = 0.4) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def brightness(x: torch.Tensor, gen: torch.Generator, shift: float = 0.15) -> torch.Tensor:
    return x + shift


def pixelate(x: torch.Tensor, gen: torch.Generator, factor: float = 0.85) -> torch.Tensor:
    h, w = x.shape[-2:]
    size = (max(1, min(h - 1, round(h * factor))), max(1, min(w - 1, round(w * factor))))  # never the identity
    small = F.interpolate(x, size=size, mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
}


def corrupt(x01: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """Apply corruption ``name`` to images in [0, 1]; the result is clipped to [0, 1]."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    out = CORRUPTIONS[name](x01, gen).clamp_(0.0, 1.0)
    return out.contiguous(memory_format=torch.channels_last)


def _top1_under(model: nn.Module, loader: Loader, name: str, gen: torch.Generator, amp: bool) -> float:
    correct = torch.zeros((), device=loader.device)
    n = 0
    for x01, y in loader:
        x = loader.normalize(corrupt(x01, name, gen))  # fp32: corruptions stay out of autocast
        with autocast(loader.device, amp):
            correct += (model(x).argmax(dim=1) == y).sum()
        n += y.numel()
    return correct.item() / max(1, n)


def robust_accuracy(
    model: nn.Module,
    ds: Any,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch_size: int = 512,
    max_samples: int | None = None,
    amp: bool = True,
) -> dict[str, float]:
    """Top-1 under each corruption of :data:`CORRUPTIONS` and their mean.

    Args:
        model: classifier (evaluated in eval mode, restored afterwards).
        ds: the evaluation Dataset (normally the test set).
        device: where to evaluate.
        seed: seeds the noise corruptions.
        batch_size: evaluation batch size (part of what makes the noise reproducible).
        max_samples: evaluate a seeded random subset of this size (faster sweeps).
        amp: bf16 autocast for the model on CUDA (the corruptions always run in fp32).

    Returns:
        ``{"robust_top1": mean, "robust/<name>": top-1, ...}`` as fractions.
    """
    device = resolve_device(device)
    if max_samples is not None and max_samples < len(ds):
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:max_samples]
        ds = ds.subset(torch.sort(pick).values)
    loader = make_loader(ds, batch_size, train=False, device=device, normalize=False)
    model.to(device)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        with torch.inference_mode():
            for i, name in enumerate(CORRUPTIONS):
                gen = torch.Generator(device=device).manual_seed(derive_seed(seed, i))
                out[f"robust/{name}"] = _top1_under(model, loader, name, gen, amp)
    finally:
        model.train(was_training)
    return {"robust_top1": sum(out.values()) / len(out), **out}
