"""The training step as one function that a CUDA graph can capture, and captured inference.

A training step on a small CNN is launch-bound: thousands of tiny kernels, each with host
overhead. :class:`GraphStep` gathers the batch from the device-resident dataset, augments it,
runs the forward (and the KD teacher's), the loss, the backward and a fused SGD step whose
learning rate lives in a device tensor, and accumulates the epoch's loss on the device. Every
shape is static and every input lives in a fixed device buffer, so on CUDA the whole step is
captured once (:func:`torch.cuda.graph`) and replayed; on the CPU the same function runs
uncaptured. The ragged last batch is dropped or padded to the full batch with a zero-weight
mask, following the loader's ``drop_last`` (the plan's ``last_batch`` says which); a padded
batch normalises with statistics over its real samples only, so padding changes no number.

:func:`plan_step` decides between this step and the plain eager loop of
:func:`~rayprune.engine.train.fit`, and says why (CPU, a streaming loader, a run too short to
repay the capture, ...).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import Loader, random_crop_flip, sample_crop_flip
from .utils import bn_layers, derive_seed

__all__ = [
    "CAPTURE_MIN_STEPS",
    "WARMUP_STEPS",
    "CapturedForward",
    "GraphStep",
    "StepPlan",
    "TrainHistory",
    "forward_fn",
    "fused_optimizer",
    "masked_kd_loss",
    "match_lr_kind",
    "plan_step",
]

#: Runs shorter than this many training steps stay eager: capturing costs a few eager warm-up
#: steps plus the capture itself. An estimate until the GPU kit's stage A measures the break-even.
CAPTURE_MIN_STEPS = 200

#: Eager steps of a batch kind (full or padded) before it is captured: lazy initialisation
#: (cuDNN/cuBLAS workspaces, the optimizer's momentum buffers) must happen outside the graph.
WARMUP_STEPS = 3

StepMode = Literal["captured", "uncaptured", "eager"]
LastBatch = Literal["dropped", "padded", "none"]


@dataclass(frozen=True)
class StepPlan:
    """How :func:`~rayprune.engine.train.fit` runs its steps, for the CLI output and the records.

    ``mode``: ``captured`` (the graph step replayed from CUDA graphs), ``uncaptured`` (the graph
    step run as plain calls, on the CPU) or ``eager`` (the plain loop). ``reason``: why.
    ``last_batch``: what happens to a ragged last batch (``none``: the batches divide the data).
    """

    mode: StepMode
    reason: str
    last_batch: LastBatch

    def as_record(self) -> dict[str, str]:
        return {"mode": self.mode, "reason": self.reason, "last_batch": self.last_batch}

    def describe(self) -> str:
        """One line, e.g. ``eager (cpu: CUDA graphs need a GPU); ragged last batch dropped``."""
        tail = "" if self.last_batch == "none" else f"; ragged last batch {self.last_batch}"
        return f"{self.mode} ({self.reason}){tail}"


class TrainHistory(list[dict[str, float]]):
    """:func:`~rayprune.engine.train.fit`'s per-epoch history, plus ``step``: how its steps ran."""

    def __init__(self, entries: list[dict[str, float]], step: StepPlan) -> None:
        super().__init__(entries)
        self.step = step


def _last_batch(loader: Any) -> LastBatch:
    if len(loader.dataset) % loader.batch_size == 0:
        return "none"
    return "dropped" if loader.drop_last else "padded"


def _custom_batchnorm(model: nn.Module) -> bool:
    return any(type(m).forward is not _BatchNorm.forward for m in bn_layers(model))


def plan_step(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    total_steps: int,
    *,
    capture: bool | None = None,
    custom_loss: bool = False,
    compile: bool = False,
) -> StepPlan:
    """Choose the training step: the captured graph step or the eager loop, with the reason.

    ``capture``: None decides (CUDA, a device-resident loader and at least
    :data:`CAPTURE_MIN_STEPS` steps capture); True asks for the graph step wherever it can run
    (uncaptured on the CPU); False keeps the eager loop.
    """
    last = _last_batch(loader)
    blocker = _blocker(model, loader, custom_loss, compile, last)
    if capture is False:
        return StepPlan("eager", "capture turned off", last)
    if blocker is not None:
        return StepPlan("eager", blocker, last)
    if device.type != "cuda":
        if capture:
            return StepPlan("uncaptured", f"{device.type}: CUDA graphs need a GPU", last)
        return StepPlan("eager", f"{device.type}: CUDA graphs need a GPU", last)
    if capture is None and total_steps < CAPTURE_MIN_STEPS:
        return StepPlan("eager", f"{total_steps} steps, under the capture's break-even of {CAPTURE_MIN_STEPS}", last)
    return StepPlan("captured", "device-resident data on CUDA", last)


def _blocker(model: nn.Module, loader: Any, custom_loss: bool, compile: bool, last: LastBatch) -> str | None:
    if type(loader) is not Loader:
        return "a streaming loader: batches are not device-resident"
    if custom_loss:
        return "a custom loss function"
    if compile:
        return "torch.compile requested"
    if last == "padded" and _custom_batchnorm(model):
        return "a custom batch-norm layer cannot mask the padded batch"
    return None


def fused_optimizer(param_groups: list[dict[str, Any]], cfg: Any, device: torch.device) -> torch.optim.SGD:
    """SGD like :func:`~rayprune.engine.train.make_optimizer`, fused, its learning rate a device
    tensor per group (the schedule fills it in place, so a captured step reads the current one)."""
    groups = [{**g, "lr": torch.tensor(cfg.lr, device=device)} for g in param_groups]
    return torch.optim.SGD(
        groups,
        lr=torch.tensor(cfg.lr, device=device),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        fused=True,
    )


def match_lr_kind(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, fused_on: torch.device | None
) -> None:
    """After loading a checkpoint written by the other step: the learning rates become device
    tensors of a fused optimizer (``fused_on``) or plain floats of the eager one. A float lr in
    a captured graph would be frozen at its capture-time value."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=fused_on) if fused_on is not None else lr
        group["fused"] = True if fused_on is not None else None
        if "initial_lr" in group:
            group["initial_lr"] = float(group["initial_lr"])
    scheduler.base_lrs = [float(b) for b in scheduler.base_lrs]
    scheduler._last_lr = [float(b) for b in scheduler._last_lr]


def masked_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    weight: torch.Tensor,
    kd_weight: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """:func:`~rayprune.engine.train.kd_loss` over the samples with ``weight`` 1 (0 = padding):
    each term is a per-sample sum divided by the number of real samples, in float32."""
    n = weight.sum()
    s = student_logits.float()
    ce = (F.cross_entropy(s, targets, reduction="none", label_smoothing=label_smoothing) * weight).sum() / n
    if teacher_logits is None or kd_weight == 0:
        return ce
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=1),
        F.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="none",
        log_target=True,
    ).sum(dim=1)
    return (1 - kd_weight) * ce + kd_weight * temperature**2 * (kl * weight).sum() / n


def _masked_batch_norm(bn: _BatchNorm, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm with statistics over the rows of weight 1 (a padded batch)."""
    dims = [0, *range(2, x.ndim)]
    shape = [1, -1] + [1] * (x.ndim - 2)
    xf = x.float()  # sums in bf16 would lose the precision the fused kernel keeps
    w = weight.view(-1, *[1] * (x.ndim - 1))
    count = weight.sum() * (xf[0].numel() // xf.shape[1])
    mean = (xf * w).sum(dims) / count
    centred = xf - mean.view(shape)
    var = (centred.square() * w).sum(dims) / count
    y = centred * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        _update_running_stats(bn, mean.detach(), var.detach() * count / (count - 1))
    return y.to(x.dtype)


@torch.no_grad()
def _update_running_stats(bn: _BatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    assert bn.num_batches_tracked is not None and bn.running_mean is not None and bn.running_var is not None
    bn.num_batches_tracked.add_(1)
    factor: float | torch.Tensor = 1.0 / bn.num_batches_tracked if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - factor).add_(mean * factor)
    bn.running_var.mul_(1 - factor).add_(unbiased_var * factor)


@contextlib.contextmanager
def _masked_batch_norms(model: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """Every training-mode BN of ``model`` normalises over the real rows of a padded batch."""
    patched = [m for m in bn_layers(model) if m.training]
    for m in patched:
        m.forward = functools.partial(_masked_batch_norm, m, weight=weight)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    # A CUDA graph cannot hold autocast's weight-cast cache: casts are recomputed in the graph.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


class GraphStep:
    """The training step over fixed device buffers; :meth:`train_epoch` runs one epoch of it.

    Per epoch the host writes the sample order, the augmentation parameters and the real-sample
    mask into device buffers (one copy, the same randomness as the :class:`Loader`); each step
    reads its slice through a device-side batch counter. With ``capture`` (CUDA only) each batch
    kind (full, padded) is captured after :data:`WARMUP_STEPS` eager steps and replayed after.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Loader,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        cfg: Any,
        *,
        teacher: nn.Module | None,
        capture: bool,
    ) -> None:
        self.model, self.loader, self.optimizer, self.scheduler, self.cfg = model, loader, optimizer, scheduler, cfg
        self.teacher = teacher if cfg.kd_weight > 0 else None
        self.capture = capture
        self.device = loader.device
        ds, b = loader.dataset, loader.batch_size
        self.batch_size = b
        self.images = ds.on_device(self.device)
        self.labels = ds.y.to(self.device)
        self.full_batches, ragged = divmod(len(ds), b)
        self.batches = len(loader)
        self.padded = ragged > 0 and not loader.drop_last
        size = max(self.batches * b, len(ds))  # room for the whole epoch's draws, used or dropped
        self.order = torch.zeros(size, dtype=torch.int64, device=self.device)
        self.params = torch.zeros(size, 3, dtype=torch.int64, device=self.device)
        self.mask = torch.zeros(size, device=self.device)
        self.mask[: len(ds)] = 1
        self.slots = torch.arange(b, device=self.device)
        self.batch_index = torch.zeros((), dtype=torch.int64, device=self.device)
        self.loss_sum = torch.zeros((), device=self.device)
        self.seen = torch.zeros((), device=self.device)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.eager_runs = {False: 0, True: 0}

    def _write_epoch(self) -> None:
        loader, n = self.loader, len(self.loader.dataset)
        if loader.train:  # the Loader's own draws, in its order: the same batches, the same crops
            gen = torch.Generator().manual_seed(derive_seed(loader.seed, loader.epoch))
            order = torch.randperm(n, generator=gen)
            params = sample_crop_flip(n, loader.dataset.crop_padding, gen)
            self.params[:n].copy_(params.to(self.device))
        else:
            order = torch.arange(n)
        self.order[:n].copy_(order.to(self.device))
        self.batch_index.zero_()
        self.loss_sum.zero_()
        self.seen.zero_()

    def step(self, padded: bool) -> None:
        """One training step on batch ``batch_index`` (the function a CUDA graph captures)."""
        pos = self.batch_index * self.batch_size + self.slots
        idx = self.order.index_select(0, pos)
        weight = self.mask.index_select(0, pos)
        images = self.images.index_select(0, idx)
        if self.loader.train:
            images = random_crop_flip(images, self.params.index_select(0, pos), self.loader.dataset.crop_padding)
        x = self.loader.normalize(images.permute(0, 3, 1, 2).float().div_(255.0))
        y = self.labels.index_select(0, idx)
        masking = _masked_batch_norms(self.model, weight) if padded else contextlib.nullcontext()
        with _autocast(self.device, self.cfg.amp), masking:
            logits = self.model(x)
            t_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(x)
        cfg = self.cfg
        loss = masked_kd_loss(logits, t_logits, y, weight, cfg.kd_weight, cfg.kd_temperature, cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            real = weight.sum()
            self.loss_sum.add_(loss.detach() * real)
            self.seen.add_(real)
            self.batch_index.add_(1)

    def _run(self, padded: bool) -> None:
        if not self.capture:
            self.step(padded)
        elif padded in self.graphs:
            self.graphs[padded].replay()
        elif self.eager_runs[padded] < WARMUP_STEPS:
            self.eager_runs[padded] += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.step(padded)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.step(padded)
            self.graphs[padded] = graph
            graph.replay()

    def train_epoch(self, bar: Any = None) -> float:
        """Run one epoch (the loader's current epoch) and return its mean loss (one host sync)."""
        self.model.train()
        self._write_epoch()
        for i in range(self.batches):
            self._run(padded=self.padded and i == self.full_batches)
            self.scheduler.step()  # fills the lr tensors in place: no host synchronisation
            if bar is not None:
                bar.update(1)
        return (self.loss_sum / self.seen.clamp(min=1)).item()


class CapturedForward:
    """``model(x)`` in eval mode for one input shape, replayed from a CUDA graph on CUDA and a
    plain call elsewhere (or for another shape): launch-bound small-batch inference costs one replay.

    The graph reads a static input buffer: a call copies ``x`` into it and returns the static
    output (overwritten by the next call; clone it to keep it). ``amp``: bf16 autocast on CUDA.
    """

    def __init__(
        self, model: nn.Module, example: torch.Tensor, *, capture: bool | None = None, amp: bool = False
    ) -> None:
        self.model, self.amp = model, amp
        self.graph: torch.cuda.CUDAGraph | None = None
        if not example.is_cuda or capture is False:
            return
        self.static_input = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side), torch.inference_mode(), _autocast(example.device, amp):
            for _ in range(WARMUP_STEPS):
                model(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode(), _autocast(example.device, amp):
            self.static_output: torch.Tensor = model(self.static_input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph is None or x.shape != self.static_input.shape:
            with _autocast(x.device, self.amp):
                return self.model(x)
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output


def forward_fn(
    model: nn.Module, example: torch.Tensor, captured: bool, amp: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The call inference uses: the captured forward when asked (a graph on CUDA only), else the model."""
    return CapturedForward(model, example, amp=amp) if captured else model
