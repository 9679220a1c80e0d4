"""Inference latency: one typed record per (model, batch size), measured interleaved.

The model runs in eval mode under ``torch.inference_mode`` with ``channels_last`` inputs, after
``warmup`` untimed calls. CPU calls are timed with ``time.perf_counter``; CUDA calls with CUDA
events (GPU time of the call, excluding host-side queueing before it).

:func:`measure_interleaved` times several models in turn on one machine: each *pass* times every
model (``repeats`` calls each, the order rotating from pass to pass), so a burst of load from
elsewhere lands on all of them rather than on whichever ran at that moment. A model's ``median``
is the median of its per-pass medians, its ``p90`` the 90th percentile of all its calls, and its
``spread`` the interquartile range of its per-pass medians: a difference between two models
smaller than their spread is not a measured difference. CPU threads are pinned for the whole
measurement.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .captured import forward_fn
from .utils import resolve_device

__all__ = [
    "BACKENDS",
    "LatencyRecord",
    "latency_metrics",
    "latency_setting",
    "measure_interleaved",
    "measure_latency",
    "records_from",
    "split_calls",
]

BACKENDS = ("torch", "onnxruntime")
DEFAULT_PASSES = 5


@dataclass(frozen=True)
class LatencyRecord:
    """The latency of one model at one batch size, and where and how it was measured.

    ``median_ms``, ``p90_ms`` and ``spread_ms`` are milliseconds per batch (see the module
    docstring); ``passes`` x ``repeats`` calls were timed; ``node`` names the machine."""

    backend: str
    device: str
    batch: int
    threads: int
    median_ms: float
    p90_ms: float
    spread_ms: float
    passes: int
    repeats: int
    node: str

    def metrics(self) -> dict[str, float]:
        """The record's numbers under the metric names the stores use: ``latency_ms_b<B>_p50``,
        ``latency_ms_b<B>_p90`` and ``latency_ms_b<B>_spread``."""
        prefix = f"latency_ms_b{self.batch}"
        return {f"{prefix}_p50": self.median_ms, f"{prefix}_p90": self.p90_ms, f"{prefix}_spread": self.spread_ms}

    def setting(self) -> dict[str, Any]:
        """How and where it was measured (the same for every batch size of one measurement)."""
        return {k: v for k, v in asdict(self).items() if k not in ("batch", "median_ms", "p90_ms", "spread_ms")}


def latency_metrics(records: Sequence[LatencyRecord]) -> dict[str, float]:
    """The metrics of several batch sizes' records, merged."""
    return {k: v for r in records for k, v in r.metrics().items()}


def latency_setting(records: Sequence[LatencyRecord]) -> dict[str, Any]:
    """What a subnet record keeps in ``source["latency"]``: the shared setting and the batch sizes."""
    if not records:
        return {}
    return {**records[0].setting(), "batches": [r.batch for r in records]}


def records_from(metrics: Mapping[str, float], setting: Mapping[str, Any]) -> list[LatencyRecord]:
    """The records back from a subnet record's ``metrics`` and ``source["latency"]`` (the inverse
    of :func:`latency_metrics` and :func:`latency_setting`); empty when it has no setting."""
    if not setting:
        return []
    shared = {k: v for k, v in setting.items() if k != "batches"}
    return [
        LatencyRecord(
            **shared,
            batch=int(b),
            median_ms=float(metrics[f"latency_ms_b{b}_p50"]),
            p90_ms=float(metrics[f"latency_ms_b{b}_p90"]),
            spread_ms=float(metrics[f"latency_ms_b{b}_spread"]),
        )
        for b in setting["batches"]
    ]


@contextmanager
def _pinned_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


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


def _batch(b: int, input_shape: Sequence[int], device: torch.device) -> torch.Tensor:
    # A private generator: timing must not advance the caller's global RNG.
    gen = torch.Generator().manual_seed(b)
    return torch.randn(b, *input_shape, generator=gen).to(device).contiguous(memory_format=torch.channels_last)


def _interleaved_times(
    models: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, passes: int, repeats: int, warmup: int
) -> list[list[list[float]]]:
    """times[model][pass] = that pass's ``repeats`` call times; the order rotates every pass."""
    for model in models:
        for _ in range(warmup):
            model(x)
    times: list[list[list[float]]] = [[] for _ in models]
    for p in range(passes):
        for i in [(j + p) % len(models) for j in range(len(models))]:
            times[i].append([_time_call_ms(models[i], x) for _ in range(repeats)])
    return times


def _summary(per_pass: list[list[float]]) -> tuple[float, float, float]:
    """(median of the pass medians, 90th percentile of all calls, interquartile range of the pass medians)."""
    medians = [float(np.median(t)) for t in per_pass]
    q25, q75 = np.percentile(medians, [25, 75])
    every_call = [t for calls in per_pass for t in calls]
    return float(np.median(medians)), float(np.percentile(every_call, 90)), float(q75 - q25)


def measure_interleaved(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    batch_sizes: Sequence[int] = (1, 64),
    passes: int = DEFAULT_PASSES,
    repeats: int = 4,
    warmup: int = 3,
    threads: int | None = None,
    node: str | None = None,
) -> dict[str, list[LatencyRecord]]:
    """Time ``models`` in turn on this machine (see the module docstring).

    Args:
        models: name -> network (moved to ``device`` and ``channels_last``; train mode is restored).
        input_shape: one sample's shape ``(C, H, W)``.
        device: where to run.
        batch_sizes: batch sizes to time.
        passes: rounds over all models per batch size.
        repeats: timed calls per model per pass.
        warmup: untimed calls per model and batch size first.
        threads: CPU threads torch uses meanwhile (default: as many as it uses now, which Ray sets
            to a task's CPUs through ``OMP_NUM_THREADS``).
        node: the machine's name in the records (default its host name).

    Returns:
        name -> one :class:`LatencyRecord` per batch size, in ``batch_sizes`` order.
    """
    if passes < 1 or repeats < 1:
        raise ValueError(f"passes and repeats must be >= 1, got {passes} and {repeats}")
    dev = resolve_device(device)
    threads = threads or torch.get_num_threads()
    names, nets = list(models), [m.to(dev).to(memory_format=torch.channels_last) for m in models.values()]
    out: dict[str, list[LatencyRecord]] = {name: [] for name in names}
    with _pinned_threads(threads), _eval_mode(nets), torch.inference_mode():
        for b in batch_sizes:
            times = _interleaved_times(nets, _batch(b, input_shape, dev), passes, repeats, warmup)
            for name, per_pass in zip(names, times, strict=True):
                median, p90, spread = _summary(per_pass)
                out[name].append(
                    LatencyRecord(
                        backend="torch",
                        device=str(dev),
                        batch=int(b),
                        threads=int(threads),
                        median_ms=median,
                        p90_ms=p90,
                        spread_ms=spread,
                        passes=passes,
                        repeats=repeats,
                        node=node or socket.gethostname(),
                    )
                )
    return out


def split_calls(calls: int, passes: int = DEFAULT_PASSES) -> tuple[int, int]:
    """``(passes, repeats)`` for about ``calls`` timed calls per model: at most ``passes`` passes."""
    passes = max(1, min(passes, calls))
    return passes, max(1, math.ceil(calls / passes))


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
    """Latency in milliseconds for each batch size of one model, timed in one pass.

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
    dev = resolve_device(device)
    model.to(dev).to(memory_format=torch.channels_last)
    out = {}
    with _eval_mode([model]), torch.inference_mode():
        for b in batch_sizes:
            x = _batch(b, input_shape, dev)
            (per_pass,) = _interleaved_times([forward_fn(model, x, captured)], x, 1, repeats, warmup)
            out[f"latency_ms_b{b}_p50"] = float(np.percentile(per_pass[0], 50))
            out[f"latency_ms_b{b}_p90"] = float(np.percentile(per_pass[0], 90))
    return out
