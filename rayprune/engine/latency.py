"""Inference latency: median and 90th percentile per batch size.

The model runs in eval mode under ``torch.inference_mode`` with ``channels_last`` inputs, after
``warmup`` untimed calls. CPU calls are timed with ``time.perf_counter``; CUDA calls with CUDA
events (GPU time of the call, excluding host-side queueing before it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .captured import forward_fn
from .utils import resolve_device

__all__ = ["measure_latency"]


def _time_call_ms(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1e3


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 5,
    repeats: int = 20,
    captured: bool = False,
) -> dict[str, float]:
    """Latency in milliseconds for each batch size.

    Args:
        model: the network (moved to ``device`` and ``channels_last``; train mode is restored).
        input_shape: one sample's shape ``(C, H, W)``.
        device: where to run.
        batch_sizes: batch sizes to time.
        warmup: untimed calls per batch size first.
        repeats: timed calls per batch size.
        captured: time a CUDA-graph replay of the forward (one graph per batch size; eager on the CPU).

    Returns:
        ``{"latency_ms_b<B>_p50": median, "latency_ms_b<B>_p90": 90th percentile, ...}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = resolve_device(device)
    model.to(device).to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    out = {}
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                # A private generator: timing must not advance the caller's global RNG.
                gen = torch.Generator().manual_seed(b)
                x = torch.randn(b, *input_shape, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
                forward = forward_fn(model, x, captured)
                for _ in range(warmup):
                    forward(x)
                times = [_time_call_ms(forward, x) for _ in range(repeats)]
                out[f"latency_ms_b{b}_p50"] = float(np.percentile(times, 50))
                out[f"latency_ms_b{b}_p90"] = float(np.percentile(times, 90))
    finally:
        model.train(was_training)
    return out
