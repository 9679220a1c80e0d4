"""Stage C: inference latency at deployment batch sizes, MACs speed-up vs measured speed-up.

Latency comes from :func:`rayprune.engine.latency.measure_latency` with captured inference
(eval mode, inference_mode, channels_last, one CUDA graph per batch size, CUDA events; median
and p90 over ``repeats`` after ``warmup``) at batch 1, 64, 256 and 1,024, and from ONNX Runtime
on the CPU (the exported graph, 1 and 4 intra-op threads, batch 1; ``ort_ms_t<N>_p50``/``_p90``).
Weights do not change the timing, so every net is built from its spec with a seeded init.

For every net the row gives ``macs_speedup`` = reference MACs / net MACs, ``speedup_b<B>`` /
``speedup_ort_t<N>`` = reference latency / net latency (medians) and ``realised_b<B>`` /
``realised_ort_t<N>`` = speed-up / MACs speed-up (1.0: the MACs saving fully realised). Each pruned net is also measured
with its channel groups rounded *up* to multiples of 8 (``round8``: tensor-core friendly widths,
a few more MACs). Rows are emitted as each net is timed (the reference first); the reference
is timed again at the end (``kind="drift"``: after / before).

* ``fixed_specs``: command 2, needs no data: ResNet-20 and -56 (``avgpool_conv``), unpruned,
  uniform width scaling to 0.5 and 0.25 of the MACs (groups rounded to 1 and to 8 channels),
  and a depth-pruned net (two blocks per stage).
* stage B's nets: command 3, from the ``spec`` of each stage-B row.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import torch

from rayprune import models

FIXED_MODELS = ("cifar_resnet:20", "cifar_resnet:56")
BATCH_SIZES = (1, 64, 256, 1024)
ORT_THREADS = (1, 4)


def round_widths(spec: dict, divisor: int = 8, ceiling: dict | None = None) -> dict:
    """``spec`` with every channel group's width rounded up to a multiple of ``divisor`` (capped
    at ``ceiling[group]`` when given, e.g. the unpruned widths)."""
    widths = {}
    for g in models.channel_groups(spec):
        w = int(math.ceil(g.width / divisor) * divisor)
        if ceiling and g.name in ceiling:
            w = min(w, max(g.width, ceiling[g.name]))
        widths[g.name] = w
    return models.with_widths(spec, widths)


def uniform_spec(full: dict, target: float, divisor: int = 1, input_size: int = 32) -> dict:
    """Largest uniform width multiplier (widths rounded to ``divisor``) meeting ``target`` x MACs."""
    groups = models.channel_groups(full)
    limit = target * models.macs(full, input_size)

    def at(t: float) -> dict:
        return models.with_widths(full, {g.name: max(divisor, round(g.width * t / divisor) * divisor) for g in groups})

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if models.macs(at(mid), input_size) <= limit:
            lo = mid
        else:
            hi = mid
    return at(lo)


def depth_spec(full: dict, blocks: int) -> dict:
    spec = dict(full)
    spec["stages"] = [stage[:blocks] for stage in full["stages"]]
    return models.validate(spec)


def fixed_specs(model: str, num_classes: int = 10) -> list[tuple[str, dict]]:
    full = models.full_spec(model, num_classes=num_classes, shortcut="avgpool_conv")
    short = model.split(":")[1]
    nets = [
        (f"r{short}/uniform0.5", uniform_spec(full, 0.5)),
        (f"r{short}/uniform0.5_div8", uniform_spec(full, 0.5, divisor=8)),
        (f"r{short}/uniform0.25", uniform_spec(full, 0.25)),
        (f"r{short}/depth2", depth_spec(full, 2)),
    ]
    return [(name, spec) for name, spec in nets if spec != full]


def _lat(
    spec: dict,
    device: torch.device,
    batch_sizes: tuple[int, ...],
    warmup: int,
    repeats: int,
    input_size: int,
    ort_threads: tuple[int, ...] = (),
) -> dict[str, float]:
    from rayprune.engine.latency import measure_latency

    net = models.build(spec, seed=0)
    out = measure_latency(
        net,
        (3, input_size, input_size),
        device=device,
        batch_sizes=batch_sizes,
        warmup=warmup,
        repeats=repeats,
        captured=True,
    )
    if ort_threads:
        out.update(ort_latency(net, input_size, ort_threads, warmup, repeats))
    del net
    return out


def ort_latency(
    net: torch.nn.Module, input_size: int, threads: tuple[int, ...], warmup: int, repeats: int
) -> dict[str, float]:
    """Batch-1 latency of ``net`` exported to ONNX, in ONNX Runtime on the CPU, per thread count."""
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    from rayprune.export import export_onnx

    net = net.cpu().eval().to(memory_format=torch.contiguous_format)
    example = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        export_onnx(net, example, path, exporter="torchscript")  # the fast exporter; same graph for timing
        x = example.numpy()
        for n in threads:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = n, 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for _ in range(warmup):
                session.run(None, {"input": x})
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                session.run(None, {"input": x})
                times.append((time.perf_counter() - t0) * 1e3)
            out[f"ort_ms_t{n}_p50"] = float(np.percentile(times, 50))
            out[f"ort_ms_t{n}_p90"] = float(np.percentile(times, 90))
    return out


def _speedups(ref: dict[str, float], lat: dict[str, float], macs_speedup: float) -> dict[str, float]:
    """Measured speed-ups per timing column and the fraction of the MACs speed-up each realises."""
    out = {}
    for key, value in lat.items():
        if key.endswith("_p50") and key in ref:
            tag = key.removeprefix("latency_ms_").removeprefix("ort_ms_").removesuffix("_p50")
            tag = f"ort_{tag}" if key.startswith("ort_") else tag
            out[f"speedup_{tag}"] = ref[key] / value
            out[f"realised_{tag}"] = out[f"speedup_{tag}"] / macs_speedup
    return out


def latency_table(
    reference: tuple[str, dict],
    nets: list[tuple[str, dict]],
    device: torch.device,
    emit: Callable[..., Any],
    *,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    ort_threads: tuple[int, ...] = ORT_THREADS,
    warmup: int = 10,
    repeats: int = 50,
    input_size: int = 32,
    round8: bool = True,
    left: Callable[[], float] = lambda: float("inf"),
    group: str = "",
) -> None:
    """Emit one row per net (and per round8 variant) plus the reference's own row."""
    ref_name, ref_spec = reference
    if ort_threads and importlib.util.find_spec("onnxruntime") is None:
        emit(kind="skipped", group=group, reason="onnxruntime is not installed here: no ONNX Runtime columns")
        ort_threads = ()
    ref_macs = models.macs(ref_spec, input_size)
    ceiling = {g.name: g.width for g in models.channel_groups(ref_spec)}
    ref = _lat(ref_spec, device, batch_sizes, warmup, repeats, input_size, ort_threads)
    emit(
        kind="reference",
        group=group,
        net=ref_name,
        macs=ref_macs,
        params=models.params(ref_spec),
        **ref,
        repeats=repeats,
        spec=ref_spec,
    )
    for name, spec in nets:
        variants = [(name, spec, False)]
        if round8:
            r8 = round_widths(spec, 8, ceiling)
            if r8 != spec:
                variants.append((f"{name}+round8", r8, True))
        for vname, vspec, rounded in variants:
            if left() < 5:
                emit(kind="skipped", group=group, net=vname, reason="budget")
                continue
            try:
                lat = _lat(vspec, device, batch_sizes, warmup, repeats, input_size, ort_threads)
            except Exception as e:  # report and go on with the other nets
                emit(kind="error", group=group, net=vname, error=f"{type(e).__name__}: {e}"[:400])
                continue
            macs = models.macs(vspec, input_size)
            speed = _speedups(ref, lat, ref_macs / macs)
            emit(
                kind="net",
                group=group,
                net=vname,
                reference=ref_name,
                round8=rounded,
                macs=macs,
                macs_pct=100 * macs / ref_macs,
                params=models.params(vspec),
                macs_speedup=ref_macs / macs,
                **speed,
                **lat,
                repeats=repeats,
                spec=vspec,
            )
    # The reference again at the end: how much the device drifted while the nets were timed.
    after = _lat(ref_spec, device, batch_sizes, warmup, repeats, input_size)
    emit(
        kind="drift",
        group=group,
        net=ref_name,
        **{f"drift_b{b}": after[f"latency_ms_b{b}_p50"] / ref[f"latency_ms_b{b}_p50"] for b in batch_sizes},
    )


def stage_c_fixed(
    device: torch.device,
    emit: Callable[..., Any],
    *,
    fixed_models: tuple[str, ...] = FIXED_MODELS,
    num_classes: int = 10,
    input_size: int = 32,
    warmup: int = 10,
    repeats: int = 50,
    left: Callable[[], float] = lambda: float("inf"),
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    ort_threads: tuple[int, ...] = ORT_THREADS,
) -> None:
    for model in fixed_models:
        if left() < 10:
            emit(kind="skipped", group=model, reason="budget")
            continue
        full = models.full_spec(model, num_classes=num_classes, shortcut="avgpool_conv")
        latency_table(
            (model, full),
            fixed_specs(model, num_classes),
            device,
            emit,
            warmup=warmup,
            repeats=repeats,
            input_size=input_size,
            left=left,
            group=f"fixed:{model}",
            batch_sizes=batch_sizes,
            ort_threads=ort_threads,
        )
