"""Preflight: is this machine's torch compatible with everything the stages use?

Checks, each printed as one ``preflight: OK|FAIL <check>: ...`` line and recorded as a row:

1. ``imports``: every module the stages import (rayprune's pure-torch core, every method module,
   torchvision, PIL, pydantic) -- fatal on failure.
2. ``device``: CUDA present, a bf16 conv forward/backward in channels_last -- fatal on failure.
3. ``engine``: ``fit`` (bf16 autocast, channels_last), ``evaluate``, robust accuracy (the
   on-device corruption RNG) and latency (CUDA events) on a tiny net -- fatal on failure.
4. ``method:<name>``: every registered method, one ``step()`` (forward + backward) and
   ``finalize()`` with its ``smoke`` settings on ``cifar_resnet:tiny`` and synthetic data.
5. ``capture``: ``SGD(fused=True)`` with a device-tensor learning rate replayed from a CUDA
   graph updates like the eager optimizer and follows the tensor's new value; ``fit`` with
   ``capture=True`` runs captured (the plan says so) to a finite loss; captured inference
   matches the eager forward. Uncaptured on the CPU. Not fatal: the captured arms report errors.
6. ``stage_b_config``: stage B's arms and recipes validated against the methods' schemas, so a
   renamed hyperparameter shows up in command 1, not at the end of command 3.

Returns whether the stages may run (no fatal failure).
"""

from __future__ import annotations

import importlib
import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .stage_b import _one_line

CORE_MODULES = [
    "rayprune",
    "rayprune.models",
    "rayprune.models.transfer",
    "rayprune.engine",
    "rayprune.engine.data",
    "rayprune.engine.train",
    "rayprune.engine.captured",
    "rayprune.engine.robust",
    "rayprune.engine.latency",
    "rayprune.engine.checkpoint",
    "rayprune.methods",
    "rayprune.methods.base",
    "rayprune.methods.finetune",
    "torchvision",
    "torchvision.transforms",
    "PIL.Image",
    "pydantic",
    "numpy",
    "bench.gpu.throughput",
    "bench.gpu.stage_b",
    "bench.gpu.stage_c",
    "bench.gpu.packing",
]


def _check(name: str, fn: Callable[[], dict[str, Any]], emit: Callable[..., Any]) -> bool:
    t0 = time.perf_counter()
    try:
        info = fn() or {}
        ok, error = True, None
    except Exception as e:
        info, ok, error = {}, False, _one_line(e)
    secs = time.perf_counter() - t0
    detail = error or ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (dict, list)))[:300]
    print(f"preflight: {'OK' if ok else 'FAIL'} {name} ({secs:.1f} s): {detail}", flush=True)
    emit(check=name, ok=ok, seconds=secs, error=error, **info)
    return ok


def _imports() -> dict[str, Any]:
    import numpy
    import pydantic
    import torch
    import torchvision

    failed = []
    for mod in CORE_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as e:
            failed.append(f"{mod}: {_one_line(e)}")
    from rayprune.methods import MODULES, get_method

    for name in MODULES:
        try:
            get_method(name)
        except Exception as e:
            failed.append(f"method {name}: {_one_line(e)}")
    if failed:
        raise ImportError("; ".join(failed))
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pydantic": pydantic.__version__,
        "numpy": numpy.__version__,
        "methods": list(MODULES),
    }


def _device(device: str) -> dict[str, Any]:
    import torch

    if not device.startswith("cuda"):
        return {"device": device, "note": "CPU run (smoke): CUDA paths not exercised"}
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False: no usable GPU for this torch")
    x = torch.randn(8, 16, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(device).to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = conv(x)
    y.float().square().mean().backward()
    torch.cuda.synchronize()
    if not math.isfinite(conv.weight.grad.abs().sum().item()):
        raise RuntimeError("non-finite gradient from a bf16 conv")
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sms": props.multi_processor_count,
        "bf16": torch.cuda.is_bf16_supported(),
        "cudnn": torch.backends.cudnn.version(),
    }


def _tiny(seed: int = 0) -> tuple[dict, Any, Any]:
    from rayprune import models
    from rayprune.engine.data import synthetic_dataset

    spec = models.full_spec("cifar_resnet:tiny", num_classes=4, shortcut="avgpool_conv")
    train, test = synthetic_dataset(n_train=160, n_test=64, num_classes=4, size=16, seed=seed)
    return spec, train, test


def _engine(device: str) -> dict[str, Any]:
    from rayprune import models
    from rayprune.engine.latency import measure_latency
    from rayprune.engine.robust import robust_accuracy
    from rayprune.engine.train import TrainConfig, evaluate, fit

    spec, train, test = _tiny()
    net = models.build(spec, seed=0)
    hist = fit(net, train, TrainConfig(epochs=1, batch_size=32, lr=0.05), device=device, progress=False)
    ev = evaluate(net, test, device=device)
    rob = robust_accuracy(net, test, device=device, seed=0, max_samples=32)
    lat = measure_latency(net, (3, 16, 16), device=device, batch_sizes=(1, 8), warmup=1, repeats=2)
    values = [hist[-1]["loss"], ev["top1"], rob["robust_top1"], *lat.values()]
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"non-finite engine outputs: {values}")
    return {
        "loss": round(hist[-1]["loss"], 4),
        "top1": ev["top1"],
        "robust_top1": rob["robust_top1"],
        "latency_ms_b1_p50": round(lat["latency_ms_b1_p50"], 3),
    }


def _method(name: str, device: str) -> dict[str, Any]:
    from rayprune import models
    from rayprune.engine.train import TrainConfig
    from rayprune.methods import Budget, RunContext, get_method
    from rayprune.methods.finetune import finalize

    spec, train, test = _tiny()
    cls = get_method(name)
    teacher = models.build(spec, seed=1)
    with tempfile.TemporaryDirectory(prefix=f"preflight-{name}-") as wd:
        ctx = RunContext(
            spec=spec,
            train=train,
            test=test,
            budget=Budget(flops_target=0.5),
            kd_weight=0.9,
            teacher=teacher,
            device=device,
            seed=0,
            workdir=wd,
            finetune=TrainConfig(epochs=1, batch_size=32, lr=0.05),
            input_size=16,
            progress=False,
            latency_batch_sizes=(1,),
            latency_repeats=2,
            robust_max_samples=32,
        )
        method = cls(ctx, cls.smoke)
        result = method.step()
        final = finalize(method, progress=False)
    m = final.record.metrics
    if not math.isfinite(m.get("test_top1", float("nan"))):
        raise FloatingPointError(f"non-finite test_top1 after finalize: {m.get('test_top1')}")
    return {"step_metrics": len(result.metrics), "macs": final.record.macs, "test_top1": m["test_top1"]}


def _fused_sgd_under_capture(device: str) -> dict[str, Any]:
    """Two steps of fused SGD (lr a device tensor, changed between the steps) against plain SGD."""
    import torch

    dev = torch.device(device)
    start = torch.randn(64, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(64, generator=torch.Generator().manual_seed(1))
    settings = {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    ref = torch.nn.Parameter(start.clone().to(dev))
    ref_opt = torch.optim.SGD([ref], lr=0.1, **settings)
    p = torch.nn.Parameter(start.clone().to(dev))
    lr = torch.tensor(0.1, device=dev)
    opt = torch.optim.SGD([p], lr=lr, fused=True, **settings)
    p.grad, ref.grad = grad.to(dev), grad.to(dev)
    opt.step()  # eager first step: creates the momentum buffer outside the graph
    ref_opt.step()
    lr.fill_(0.05)
    ref_opt.param_groups[0]["lr"] = 0.05
    captured = dev.type == "cuda"
    if captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        graph.replay()
        torch.cuda.synchronize()
    else:
        opt.step()
    ref_opt.step()
    diff = (p.detach() - ref.detach()).abs().max().item()
    if not diff < 1e-5:
        raise RuntimeError(f"fused SGD with a tensor lr{' under capture' if captured else ''} differs by {diff:.2e}")
    return {"fused_sgd_max_diff": diff, "fused_sgd_captured": captured}


def _capture(device: str) -> dict[str, Any]:
    import torch

    from rayprune import models
    from rayprune.engine.captured import CapturedForward
    from rayprune.engine.train import TrainConfig, fit

    info = _fused_sgd_under_capture(device)
    spec, train, _ = _tiny()
    net = models.build(spec, seed=0)
    hist = fit(net, train, TrainConfig(epochs=2, batch_size=32, lr=0.05), device=device, progress=False, capture=True)
    if not math.isfinite(hist[-1]["loss"]):
        raise FloatingPointError(f"non-finite loss from the graph step: {hist[-1]['loss']}")
    expected = "captured" if device.startswith("cuda") else "uncaptured"
    if hist.step.mode != expected:
        raise RuntimeError(f"fit(capture=True) ran {hist.step.describe()}, expected {expected}")
    net.eval()
    x = torch.randn(8, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        forward = CapturedForward(net, x)
        diff = (forward(x).float() - net(x).float()).abs().max().item()
    if not diff < 1e-3:
        raise RuntimeError(f"captured inference differs from the eager forward by {diff:.2e}")
    return {**info, "graph_step": hist.step.describe(), "loss": round(hist[-1]["loss"], 4), "forward_max_diff": diff}


def _stage_b_config(smoke: bool) -> dict[str, Any]:
    from .stage_b import ARMS, validate_config

    problems = validate_config(smoke)
    if problems:
        raise ValueError(" | ".join(problems))
    return {"arms": [a["arm"] for a in ARMS]}


def preflight(
    device: str, emit: Callable[..., Any], smoke: bool = False, methods: list[str] | None = None
) -> tuple[bool, int]:
    """Run the checks; returns (may the stages run, number of failed checks)."""
    failed = 0
    for name, fn in (("imports", _imports), ("device", lambda: _device(device)), ("engine", lambda: _engine(device))):
        if not _check(name, fn, emit):
            print(
                f"preflight: STOP: {name} failed on this machine; nothing else can run (see the FAIL line above)",
                flush=True,
            )
            return False, failed + 1
    from rayprune.methods import MODULES

    for name in methods or list(MODULES):
        failed += not _check(f"method:{name}", lambda name=name: _method(name, device), emit)
    failed += not _check("capture", lambda: _capture(device), emit)
    failed += not _check("stage_b_config", lambda: _stage_b_config(smoke), emit)
    print(f"preflight: {'all checks OK' if not failed else f'{failed} check(s) FAILED (stages still run)'}", flush=True)
    return True, failed
