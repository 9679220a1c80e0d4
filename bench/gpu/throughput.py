"""Stage A: training throughput of the engine against a plain PyTorch loop, interleaved.

Two loops train the same network with the same batch size and SGD settings, in one process:

* **engine**: ``rayprune.engine.fit`` on a device-resident :class:`Dataset` (on-device
  crop/flip/normalise, no workers); one chunk = one ``fit`` call of ``steps`` steps (a short
  epoch: loader set-up, shuffling and the epoch-end sync included).
* **reference**: the usual research-script loop: a ``DataLoader`` (shuffle, ``min(8, cpus)``
  persistent workers, pinned memory) over the same uint8 images with torchvision's
  ``RandomCrop(32, 4)`` / ``RandomHorizontalFlip`` / ``ToTensor`` / ``Normalize`` applied per
  PIL image (exactly what ``torchvision.datasets.CIFAR10`` does), ``loss.item()`` every step;
  one chunk = a fresh iterator (a short epoch) of ``steps`` steps.

Each *setting* (fp32 NCHW, or bf16 autocast + channels_last; eager or ``torch.compile``) applies
to both loops. Every arm gets one untimed warm-up chunk (for compiled arms its excess over a
timed chunk is reported as ``compile_s``), then the arms run **interleaved** for ``rounds``
rounds (A B C D, then D C B A, ...), so drift and background load hit them alike; ratios are
medians of the per-round ratios. Images/s become an epoch time (50,000 images) and achieved
TFLOP/s from the analytic MACs (training ~ 3 x forward MACs x 2 FLOPs).

``bench/train_throughput.py`` is the command-line front end on a local CIFAR-10 folder; the GPU
kit's stage A (``run.py --command 1``) uses :func:`stage_a`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rayprune import models
from rayprune.engine.data import Dataset
from rayprune.engine.train import TrainConfig, autocast, fit, make_optimizer

MODEL = "cifar_resnet:56"
IMAGES_PER_EPOCH = 50_000  # CIFAR-10's training set: epoch times are reported for it


@dataclass(frozen=True)
class Setting:
    precision: str  # "fp32" or "bf16"
    channels_last: bool
    compile: bool

    @property
    def name(self) -> str:
        return f"{self.precision}{'_cl' if self.channels_last else ''}/{'compile' if self.compile else 'eager'}"

    @property
    def amp(self) -> bool:
        return self.precision == "bf16"


FP32 = Setting("fp32", False, False)
BF16_CL = Setting("bf16", True, False)
FP32_COMPILE = Setting("fp32", False, True)
BF16_CL_COMPILE = Setting("bf16", True, True)
SETTINGS = {"fp32": FP32, "bf16_cl": BF16_CL, "fp32_compile": FP32_COMPILE, "bf16_cl_compile": BF16_CL_COMPILE}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TimeLimit` in the main thread after ``seconds`` (bounds a torch.compile)."""
    if seconds is None or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise TimeLimit(f"over its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------------
# The two loops
# --------------------------------------------------------------------------------------------


class ReferenceData(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does after loading its pickles: a PIL image per item."""

    def __init__(self, x_nhwc: np.ndarray, y: np.ndarray, transform: Callable) -> None:
        self.x, self.y, self.transform = x_nhwc, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def reference_transform(ds: Dataset) -> Callable:
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomCrop(ds.input_size, padding=ds.crop_padding),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(ds.mean, ds.std),
        ]
    )


def chunk_config(setting: Setting, batch_size: int) -> TrainConfig:
    return TrainConfig(
        epochs=1,
        batch_size=batch_size,
        schedule="constant",
        amp=setting.amp,
        channels_last=setting.channels_last,
        compile=setting.compile,
    )


class EngineArm:
    loop = "engine"

    def __init__(
        self, train: Dataset, spec: dict, setting: Setting, steps: int, batch_size: int, device: torch.device
    ) -> None:
        self.setting, self.steps, self.batch_size, self.device = setting, steps, batch_size, device
        n = steps * batch_size
        self.data = train.subset(torch.arange(n) % len(train))  # wraps around small (smoke) sets
        self.data.on_device(device)  # the one-time upload (shared by a sweep's trials): not timed
        self.cfg = chunk_config(setting, batch_size)
        self.net = models.build(spec, seed=0)
        self.chunks = 0

    @property
    def name(self) -> str:
        return f"engine/{self.setting.name}"

    def chunk(self) -> float:
        """Seconds for one ``fit`` call of ``steps`` steps."""
        sync(self.device)
        t0 = time.perf_counter()
        # capture=False: this arm is the eager engine however long a chunk is.
        fit(self.net, self.data, self.cfg, device=self.device, seed=self.chunks, progress=False, capture=False)
        sync(self.device)
        self.chunks += 1
        return time.perf_counter() - t0


class ReferenceArm:
    loop = "reference"

    def __init__(
        self,
        train: Dataset,
        spec: dict,
        setting: Setting,
        steps: int,
        batch_size: int,
        device: torch.device,
        workers: int | None = None,
        x_nhwc: np.ndarray | None = None,
    ) -> None:
        self.setting, self.steps, self.batch_size, self.device = setting, steps, batch_size, device
        x = x_nhwc if x_nhwc is not None else train.x.permute(0, 2, 3, 1).contiguous().numpy()
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        data = ReferenceData(x, train.y.numpy(), reference_transform(train))
        self.loader = torch.utils.data.DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        self.net = models.build(spec, seed=0).to(device).train()
        if setting.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(self.net, chunk_config(setting, batch_size))
        self.step_model = torch.compile(self.net) if setting.compile else self.net

    @property
    def name(self) -> str:
        return f"reference/{self.setting.name}"

    def chunk(self) -> float:
        """Seconds for ``steps`` steps from a fresh iterator (a short epoch, pipeline fill included)."""
        sync(self.device)
        t0 = time.perf_counter()
        batches = iter(self.loader)
        for _ in range(self.steps):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(self.loader)
                x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.setting.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.setting.amp):
                loss = F.cross_entropy(self.step_model(x).float(), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss.item()  # what a logging research loop does every step
        sync(self.device)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Interleaving
# --------------------------------------------------------------------------------------------


def warm_up(arm: Any, limit_s: float | None) -> dict[str, Any]:
    """One untimed chunk (compiles a compiled arm). Returns its seconds or the failure."""
    try:
        with time_limit(limit_s):
            return {"warmup_s": arm.chunk()}
    except TimeLimit as e:
        return {"error": f"warm-up (compile) {e}"}
    except Exception as e:  # an incompatible torch.compile / backend on this machine: report, go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def interleave(arms: list[Any], rounds: int, left: Callable[[], float]) -> dict[str, list[float]]:
    """Chunk seconds per arm, arms alternating A B C, C B A, ... for up to ``rounds`` rounds
    (fewer when the next round would not fit in ``left()`` seconds)."""
    times: dict[str, list[float]] = {a.name: [] for a in arms}
    for r in range(rounds):
        t0 = time.perf_counter()
        for arm in arms if r % 2 == 0 else arms[::-1]:
            times[arm.name].append(arm.chunk())
        if r + 1 < rounds and left() < 1.2 * (time.perf_counter() - t0):
            break
    return times


def arm_row(arm: Any, secs: list[float], macs: int, warm: dict[str, Any], model: str) -> dict[str, Any]:
    images = arm.steps * arm.batch_size
    rates = [images / s for s in secs]
    med = statistics.median(rates)
    row = {
        "kind": "arm",
        "arm": arm.name,
        "loop": arm.loop,
        "model": model,
        "precision": arm.setting.precision,
        "channels_last": arm.setting.channels_last,
        "compile": arm.setting.compile,
        "amp_active": arm.setting.amp and arm.device.type == "cuda",
        "batch_size": arm.batch_size,
        "steps_per_chunk": arm.steps,
        "rounds": len(secs),
        "img_s": med,
        "img_s_all": rates,
        "step_ms": 1e3 * arm.batch_size / med,
        "epoch_s": IMAGES_PER_EPOCH / med,
        "tflops": med * 3 * 2 * macs / 1e12,
        "macs_per_image": macs,
        **warm,
    }
    if arm.setting.compile and "warmup_s" in warm:
        row["compile_s"] = max(0.0, warm["warmup_s"] - statistics.median(secs))
    return row


def ratio_row(num: Any, den: Any, times: dict[str, list[float]]) -> dict[str, Any]:
    # Per round: (images/s of num) / (images/s of den) = den seconds / num seconds (same images per chunk).
    a, b = times[num.name], times[den.name]
    ratios = [
        (tb / (den.steps * den.batch_size)) / (ta / (num.steps * num.batch_size)) for ta, tb in zip(a, b, strict=True)
    ]
    return {
        "kind": "ratio",
        "ratio": f"{num.name} / {den.name}",
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "rounds": len(ratios),
    }


def compare(
    arms: list[Any],
    ratios: list[tuple[Any, Any]],
    rounds: int,
    macs: int,
    model: str,
    left: Callable[[], float],
    warm_limit: Callable[[Any], float | None],
    emit: Callable[..., Any],
) -> list[Any]:
    """Warm up ``arms``, interleave them, emit one row per arm and per ratio. Returns the arms that ran."""
    warm = {}
    ok = []
    for arm in arms:
        limit = warm_limit(arm)
        if getattr(arm, "_warm", None) is None and limit is not None and limit < 10:
            w = {"error": f"skipped: {limit:.0f} s of the compile budget left"}
        else:
            w = getattr(arm, "_warm", None) or warm_up(arm, limit)
        warm[arm.name] = w
        arm._warm = w
        if "error" in w:
            emit(kind="arm", arm=arm.name, loop=arm.loop, model=model, compile=arm.setting.compile, **w)
        else:
            ok.append(arm)
    if not ok or (any(a.setting.compile for a in arms) and not any(a.setting.compile for a in ok)):
        return []  # nothing compiled: the eager arms were measured in their own phase already
    times = interleave(ok, rounds, left)
    for arm in ok:
        arm._times_median = statistics.median(times[arm.name])
        emit(**arm_row(arm, times[arm.name], macs, warm[arm.name], model))
    for num, den in ratios:
        if num in ok and den in ok:
            emit(**ratio_row(num, den, times))
    return ok


def stage_a(
    train: Dataset,
    device: torch.device,
    emit: Callable[..., Any],
    *,
    model: str = MODEL,
    shortcut: str | None = None,
    steps: int = 40,
    batch_size: int = 128,
    rounds: int = 5,
    compile_settings: tuple[str, ...] = ("bf16_cl_compile", "fp32_compile"),
    compile_budget_s: float = 120.0,
    left: Callable[[], float] = lambda: float("inf"),
    workers: int | None = None,
) -> list[Any]:
    """Eager phase (fp32 and bf16+channels_last, engine and reference, interleaved), then one
    phase per compiled setting (compiled engine and reference interleaved with their eager
    counterparts) while the compile budget lasts. Rows go to ``emit(**row)``."""
    options = {"shortcut": shortcut} if shortcut else {}
    spec = models.full_spec(model, num_classes=train.num_classes, **options)
    macs = models.macs(spec, train.input_size)
    x_nhwc = train.x.permute(0, 2, 3, 1).contiguous().numpy()

    def make(loop: str, setting: Setting) -> Any:
        if loop == "engine":
            return EngineArm(train, spec, setting, steps, batch_size, device)
        return ReferenceArm(train, spec, setting, steps, batch_size, device, workers, x_nhwc)

    eager = {(loop, s.name): make(loop, s) for s in (FP32, BF16_CL) for loop in ("reference", "engine")}
    e = lambda loop, s: eager[(loop, s.name)]  # noqa: E731  # a short lookup for the lists below
    arms = [e("reference", FP32), e("engine", FP32), e("reference", BF16_CL), e("engine", BF16_CL)]
    ratios = [
        (e("engine", FP32), e("reference", FP32)),
        (e("engine", BF16_CL), e("reference", BF16_CL)),
        (e("engine", BF16_CL), e("reference", FP32)),
        (e("reference", BF16_CL), e("reference", FP32)),
    ]
    compare(arms, ratios, rounds, macs, model, left, lambda arm: None, lambda **r: emit(phase="eager", **r))
    spent = 0.0
    for name in compile_settings:
        setting = SETTINGS[name]
        budget = min(compile_budget_s - spent, left() - 20)
        if budget < 15:
            emit(kind="skipped", phase=name, reason=f"compile budget left {budget:.0f} s")
            continue
        eager_s = Setting(setting.precision, setting.channels_last, False)
        ref_c, eng_c = make("reference", setting), make("engine", setting)
        t0 = time.perf_counter()
        # The engine compiles first: if the budget runs out during the reference's compile,
        # the compiled engine is still compared with both eager loops.
        arms = [eng_c, ref_c, e("engine", eager_s), e("reference", eager_s)]
        if eager_s != FP32:  # the plain research loop stays in every phase: the headline ratio's denominator
            arms.append(e("reference", FP32))
        ratios = [
            (eng_c, ref_c),
            (eng_c, e("engine", eager_s)),
            (ref_c, e("reference", eager_s)),
            (eng_c, e("reference", FP32)),
        ]

        def per_arm(arm: Any, t0: float = t0, budget: float = budget) -> float:
            return max(1.0, budget - (time.perf_counter() - t0))

        compare(arms, ratios, rounds, macs, model, left, per_arm, lambda name=name, **r: emit(phase=name, **r))
        spent += time.perf_counter() - t0
    return list(eager.values())


def calibrate(
    train: Dataset, device: torch.device, model: str, shortcut: str | None, batch_size: int, steps: int, chunks: int = 3
) -> dict[str, Any]:
    """Seconds per 50,000-image epoch of ``model`` with the engine's default setting on this
    device (bf16 + channels_last, eager): what stage B sizes itself from."""
    options = {"shortcut": shortcut} if shortcut else {}
    spec = models.full_spec(model, num_classes=train.num_classes, **options)
    arm = EngineArm(train, spec, BF16_CL, steps, batch_size, device)
    arm.chunk()
    secs = statistics.median(arm.chunk() for _ in range(chunks))
    img_s = steps * batch_size / secs
    return {
        "model": model,
        "shortcut": shortcut,
        "batch_size": batch_size,
        "img_s": img_s,
        "epoch_s": IMAGES_PER_EPOCH / img_s,
        "device": str(device),
    }


# --------------------------------------------------------------------------------------------
# Captured engine and torch.compile(mode="reduce-overhead"): the launch-bound arms (issue 26)
# --------------------------------------------------------------------------------------------


def reference_source_hash() -> str:
    """A hash of the reference loop's source: the rows say which loop every ratio is against."""
    import hashlib
    import inspect

    parts = [inspect.getsource(obj) for obj in (ReferenceData, reference_transform, ReferenceArm)]
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:12]


class PersistentEngineArm:
    """The engine's device-resident data path with one model and optimizer kept across chunks:
    ``captured`` runs the graph step (CUDA graphs on CUDA, the capture done in the warm-up
    chunk), otherwise ``torch.compile(mode="reduce-overhead")`` of the model with the eager
    step. One chunk = one epoch of ``steps`` batches."""

    loop = "engine"

    def __init__(
        self,
        train: Dataset,
        spec: dict,
        setting: Setting,
        steps: int,
        batch_size: int,
        device: torch.device,
        captured: bool,
    ) -> None:
        from rayprune.engine.captured import GraphStep, fused_optimizer
        from rayprune.engine.data import make_loader
        from rayprune.engine.train import make_scheduler

        self.setting, self.steps, self.batch_size, self.device = setting, steps, batch_size, device
        self.captured = captured
        data = train.subset(torch.arange(steps * batch_size) % len(train))
        self.loader = make_loader(data, batch_size, train=True, device=device, seed=0)
        self.cfg = chunk_config(setting, batch_size)
        self.net = models.build(spec, seed=0).to(device)
        if setting.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.chunks = 0
        if captured:
            groups = [{"params": list(self.net.parameters()), "weight_decay": self.cfg.weight_decay}]
            opt = fused_optimizer(groups, self.cfg, device)
            sched = make_scheduler(opt, self.cfg, len(self.loader))
            self.graph = GraphStep(
                self.net, self.loader, opt, sched, self.cfg, teacher=None, capture=device.type == "cuda"
            )
        else:
            self.opt = make_optimizer(self.net, self.cfg)
            self.step_model = torch.compile(self.net, mode="reduce-overhead")

    @property
    def name(self) -> str:
        kind = "captured" if self.captured else "compile-reduce-overhead"
        return f"engine/{self.setting.precision}{'_cl' if self.setting.channels_last else ''}/{kind}/b{self.batch_size}"

    def chunk(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.loader.set_epoch(self.chunks)
        if self.captured:
            self.graph.train_epoch()
        else:
            self._compiled_epoch()
        sync(self.device)
        self.chunks += 1
        return time.perf_counter() - t0

    def _compiled_epoch(self) -> None:
        self.net.train()
        for x, y in self.loader:
            with autocast(self.device, self.setting.amp):
                loss = F.cross_entropy(self.step_model(x).float(), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


class BatchEngineArm(EngineArm):
    """The eager engine arm, named with its batch size (the captured phase runs several)."""

    @property
    def name(self) -> str:
        return f"engine/{self.setting.name}/b{self.batch_size}"


class BatchReferenceArm(ReferenceArm):
    """The unchanged reference loop, named with its batch size."""

    @property
    def name(self) -> str:
        return f"reference/{self.setting.name}/b{self.batch_size}"


def capture_phase(
    train: Dataset,
    device: torch.device,
    emit: Callable[..., Any],
    *,
    model: str = MODEL,
    batch_sizes: tuple[int, ...] = (128, 512),
    steps: int = 40,
    rounds: int = 5,
    reduce_overhead: bool = True,
    compile_limit_s: float = 90.0,
    left: Callable[[], float] = lambda: float("inf"),
    workers: int | None = None,
) -> None:
    """Per batch size, interleave the reference loop (fp32, unchanged), the eager engine, the
    captured engine (bf16 + channels_last) and ``torch.compile(mode="reduce-overhead")``; rows
    carry ``reference_hash``. The captured arm's warm-up chunk holds the capture: its excess over
    a timed chunk is ``capture_s``, and ``break_even_steps`` = capture_s / (eager step - captured
    step) is how many steps a run needs before capturing pays."""
    spec = models.full_spec(model, num_classes=train.num_classes)
    macs = models.macs(spec, train.input_size)
    ref_hash = reference_source_hash()
    for b in batch_sizes:
        if left() < 20:
            emit(kind="skipped", phase="capture", batch_size=b, reason=f"stage time left {left():.0f} s")
            continue
        ref = BatchReferenceArm(train, spec, FP32, steps, b, device, workers)
        eager = BatchEngineArm(train, spec, BF16_CL, steps, b, device)
        cap = PersistentEngineArm(train, spec, BF16_CL, steps, b, device, captured=True)
        arms: list[Any] = [ref, eager, cap]
        ratios = [(cap, ref), (cap, eager), (eager, ref)]
        if reduce_overhead:
            ro = PersistentEngineArm(train, spec, BF16_CL, steps, b, device, captured=False)
            arms.append(ro)
            ratios += [(ro, ref), (cap, ro)]

        def limit(arm: Any) -> float | None:
            return min(compile_limit_s, max(1.0, left() - 10)) if not getattr(arm, "captured", True) else None

        tagged = lambda **r: emit(phase="capture", reference_hash=ref_hash, **r)  # noqa: E731
        ran = compare(arms, ratios, rounds, macs, model, left, limit, tagged)
        if cap in ran and eager in ran:
            emit(phase="capture", **break_even_row(cap, eager, b))


def break_even_row(cap: Any, eager: Any, batch_size: int) -> dict[str, Any]:
    """Steps a run needs before the capture's one-time cost is repaid (None: capture is slower)."""
    cap_chunk, eager_chunk = cap._times_median, eager._times_median
    capture_s = max(0.0, cap._warm["warmup_s"] - cap_chunk)
    saved_per_step = (eager_chunk - cap_chunk) / cap.steps
    return {
        "kind": "break_even",
        "batch_size": batch_size,
        "capture_s": capture_s,
        "eager_step_ms": 1e3 * eager_chunk / eager.steps,
        "captured_step_ms": 1e3 * cap_chunk / cap.steps,
        "break_even_steps": capture_s / saved_per_step if saved_per_step > 0 else None,
    }
