"""The one training loop of rayprune: :func:`fit` and :func:`evaluate`, plus their building blocks.

:func:`fit` trains in place with SGD (momentum, Nesterov), a per-iteration cosine/step/constant
schedule with linear warm-up, optional label smoothing, gradient clipping and knowledge
distillation from a frozen teacher. On CUDA it runs in bf16 autocast (no loss scaling needed)
and ``channels_last``. Randomness comes from ``seed`` only: the caller's global RNG state is
neither read nor changed. With ``checkpoint_dir`` it writes ``last.pt`` atomically after every
epoch and, when that file exists, resumes from it so that the continued run matches an
uninterrupted one (bitwise on CPU).

Methods with their own alternating loops (e.g. weights vs. architecture parameters) use
:func:`make_optimizer`, :func:`make_scheduler`, :func:`autocast` and :func:`kd_loss` directly.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import InputError
from . import checkpoint as ckpt
from .captured import GraphStep, TrainHistory, forward_fn, fused_optimizer, match_lr_kind, plan_step
from .data import Loader, make_loader
from .progress import label as progress_label
from .utils import bn_layers, image_layout, resolve_device

__all__ = [
    "TrainConfig",
    "autocast",
    "evaluate",
    "fit",
    "kd_loss",
    "make_optimizer",
    "make_scheduler",
    "recalibrate_bn",
    "recalibration_batches",
]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class TrainConfig(BaseModel):
    """The training recipe. Defaults follow the CIFAR ResNet literature (TAS 2.8) except epochs.

    ``warmup_epochs`` of linear warm-up come first and count towards ``epochs``; ``milestones``
    (for ``schedule="step"``) are epochs from the start. ``kd_weight`` > 0 needs a teacher.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    no_decay_bn_bias: bool = True
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0, ge=0)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    kd_weight: float = Field(0.0, ge=0, le=1)
    kd_temperature: float = Field(4.0, gt=0)
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.epochs and self.warmup_epochs >= self.epochs and self.schedule == "cosine":
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs}) for a cosine schedule"
            )
        if sorted(self.milestones) != self.milestones:
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        return self


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    weight: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton distillation: ``(1-w)*CE(s, y) + w*T^2*KL(softmax(t/T) || softmax(s/T))``, KL batch-mean.

    Computed in float32 whatever the autocast dtype of the logits.
    """
    s, t = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(s, targets, label_smoothing=label_smoothing)
    if weight == 0:
        return ce
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=1),
        F.log_softmax(t / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - weight) * ce + weight * temperature**2 * kl


def _param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool) -> list[dict[str, Any]]:
    if not no_decay_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    # 1-d parameters are exactly BN affine weights and biases in these families.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model_or_params: nn.Module | Iterable[Any], cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with the config's lr, momentum, Nesterov and weight decay.

    A module gets two parameter groups when ``no_decay_bn_bias`` (no decay on 1-d params);
    an iterable of parameters or parameter groups is passed through unchanged.
    """
    if isinstance(model_or_params, nn.Module):
        params: Any = _param_groups(model_or_params, cfg.weight_decay, cfg.no_decay_bn_bias)
    else:
        params = list(model_or_params)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at iteration ``step`` (0-based) of the run."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / total)))
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (call ``scheduler.step()`` after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))


def autocast(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (when ``enabled``); a no-op on CPU, where training stays fp32."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _as_loader(data: Any, batch_size: int, device: torch.device, train: bool, seed: int = 0) -> Loader:
    if isinstance(data, Loader):
        if data.device.type != device.type:
            raise ValueError(
                f"the loader yields batches on {data.device} but the model runs on {device}; "
                f"build it with make_loader(..., device={str(device)!r})"
            )
        return data
    return make_loader(data, batch_size, train=train, device=device, seed=seed)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    amp: bool = True,
    captured: bool = False,
) -> dict[str, float]:
    """Top-1, top-5 (``min(5, classes)``) accuracy as fractions and mean cross-entropy.

    ``data`` is a Dataset (evaluated in order, no augmentation) or a Loader. The model is put in
    eval mode and restored afterwards; it is moved to ``device``. ``captured``: full batches replay
    one CUDA graph of the forward (CUDA only; the ragged last batch and the CPU run eagerly).
    """
    device = resolve_device(device)
    loader = _as_loader(data, batch_size, device, train=False)
    model.to(device)
    k = min(5, loader.dataset.num_classes)
    correct1 = torch.zeros((), device=device)
    correctk = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    n = 0
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    with _eval_mode(model), torch.inference_mode(), autocast(device, amp):
        for x, y in loader:
            if forward is None:  # the first batch has the full batch's shape
                forward = forward_fn(model, x, captured, amp)
            logits = forward(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            topk = logits.topk(k, dim=1).indices
            hits = topk == y[:, None]
            correct1 += hits[:, 0].sum()
            correctk += hits.any(dim=1).sum()
            n += y.numel()
    if n == 0:
        raise InputError("evaluate: the dataset is empty")
    return {"top1": correct1.item() / n, "top5": correctk.item() / n, "loss": loss_sum.item() / n}


def recalibration_batches(
    data: Any, images: int, batch_size: int, *, device: str | torch.device, seed: int
) -> Iterator[torch.Tensor]:
    """Un-augmented image batches of a seeded random subset of ``images`` samples of ``data``.

    Random, not the first samples: splits keep the dataset's order, and image-folder datasets
    are sorted by class, so leading batches would hold one or two classes only.
    """
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:images]
    for x, _ in make_loader(data.subset(pick), batch_size, train=False, device=device):
        yield x


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BN's running statistics as the cumulative average (momentum=None) over
    ``batches`` forwarded in train mode; leaves the model in eval mode.

    A pruned or weight-shared subnet's narrower inputs shift each layer's statistics, so
    inherited (or super-net) running stats would mis-normalise it; this costs forward passes only.
    """
    bns = bn_layers(model)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _make_loss(cfg: TrainConfig, teacher: nn.Module | None, loss_fn: LossFn | None) -> LossFn:
    if loss_fn is not None:
        return loss_fn
    if cfg.kd_weight > 0 and teacher is None:
        raise InputError("TrainConfig.kd_weight > 0 needs a teacher: pass fit(..., teacher=model)")

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if teacher is None or cfg.kd_weight == 0:
            return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            t_logits = teacher(x)
        return kd_loss(logits, t_logits, y, cfg.kd_weight, cfg.kd_temperature, cfg.label_smoothing)

    return loss


class _Run:
    """The mutable state of one fit() call (model, optimizer, schedule, history), checkpointable."""

    def __init__(
        self, model: nn.Module, loader: Loader, cfg: TrainConfig, seed: int, fused_on: torch.device | None = None
    ) -> None:
        self.model, self.loader, self.cfg, self.seed, self.fused_on = model, loader, cfg, seed, fused_on
        if fused_on is None:
            self.optimizer = make_optimizer(model, cfg)
        else:  # the graph step's optimizer: fused, its lr a device tensor
            groups = _param_groups(model, cfg.weight_decay, cfg.no_decay_bn_bias)
            self.optimizer = fused_optimizer(groups, cfg, fused_on)
        self.scheduler = make_scheduler(self.optimizer, cfg, len(loader))
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.capture_rng(torch_only=True),
            "loader": self.loader.state_dict(),
            "epoch": len(self.history),
            "history": self.history,
            "config": self.cfg.model_dump(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        if state.get("config") != self.cfg.model_dump() or state.get("seed") != self.seed:
            raise InputError(
                f"checkpoint {path} was written by a run with a different TrainConfig or seed; "
                "use another checkpoint_dir or delete the file to start over"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        match_lr_kind(self.optimizer, self.scheduler, self.fused_on)  # the checkpoint's step may be the other one
        self.loader.load_state_dict(state["loader"])
        ckpt.restore_rng(state["rng"])
        self.history = list(state["history"])


def _train_epoch(run: _Run, step_model: nn.Module, loss: LossFn, device: torch.device, bar: Any) -> float:
    cfg, model = run.cfg, run.model
    model.train()
    loss_sum = torch.zeros((), device=device)
    n = 0
    for x, y in run.loader:
        with autocast(device, cfg.amp):
            batch_loss = loss(step_model, x, y)
        run.optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        loss_sum += batch_loss.detach() * y.numel()  # stays on the device: no sync per step
        n += y.numel()
        if bar is not None:
            bar.update(1)
    return loss_sum.item() / max(1, n)


def fit(
    model: nn.Module,
    train: Any,
    cfg: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    teacher: nn.Module | None = None,
    seed: int = 0,
    val: Any = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool | None = None,
    loss_fn: LossFn | None = None,
    on_epoch: Callable[[dict[str, float]], bool | None] | None = None,
    capture: bool | None = None,
) -> TrainHistory:
    """Train ``model`` in place and return the per-epoch history.

    Args:
        model: the network; moved to ``device`` (and ``channels_last`` when configured).
        train: a Dataset (a seeded, augmenting loader is built) or a Loader (used as is).
        cfg: the recipe.
        device: where to train.
        teacher: frozen KD teacher (eval mode, no gradients), used when ``cfg.kd_weight > 0``.
        seed: seeds shuffling, augmentation and any other randomness inside training.
        val: optional Dataset/Loader evaluated after every epoch (adds ``val_top1``, ``val_loss``).
        checkpoint_dir: write ``last.pt`` there after every epoch and resume from it when present.
        progress: tqdm bar; ``None`` shows it only when stderr is a terminal.
        loss_fn: ``loss_fn(model, x, y) -> loss`` replaces the (KD-)cross-entropy.
        on_epoch: called with each epoch's history entry; returning True stops training early.
        capture: the training step (see :func:`~rayprune.engine.captured.plan_step`): None captures
            it in CUDA graphs where that pays (CUDA, device-resident data, a long enough run), True
            runs the graph step wherever it can (uncaptured on the CPU), False keeps the eager loop.

    Returns:
        One dict per completed epoch: ``epoch`` (0-based), ``loss`` (mean train loss), ``lr`` (at the
        epoch's end) and ``val_top1``/``val_loss`` when ``val`` is given; its ``step`` attribute
        (a :class:`~rayprune.engine.captured.StepPlan`) says how the steps ran and why.

    Raises:
        FloatingPointError: the training loss became NaN/inf (lower the learning rate).
    """
    device = resolve_device(device)
    model.to(device)
    # An earlier run may have left the weights channels_last (latency timing does); on the CPU
    # that would pull the convs back onto oneDNN's faulty NHWC path (see image_layout).
    model.to(memory_format=image_layout(device) if cfg.channels_last else torch.contiguous_format)
    if teacher is not None:
        teacher.to(device).eval()
    loader = _as_loader(train, cfg.batch_size, device, train=True, seed=seed)
    if len(loader) == 0:
        raise InputError(f"fit: no training batches ({len(loader.dataset)} samples, batch_size {loader.batch_size})")
    step_model = cast(nn.Module, torch.compile(model)) if cfg.compile else model  # compiling a Module gives one
    loss = _make_loss(cfg, teacher, loss_fn)
    plan = plan_step(
        model,
        loader,
        device,
        cfg.epochs * len(loader),
        capture=capture,
        custom_loss=loss_fn is not None,
        compile=cfg.compile,
    )
    path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    # Fork the global RNGs: training is reproducible from `seed` and the caller's streams are untouched.
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        run = _Run(model, loader, cfg, seed, fused_on=device if plan.mode != "eager" else None)
        if path is not None and path.exists():
            run.load_state_dict(
                ckpt.safe_load(path, "training checkpoint", f"delete {path} to restart that training"), path
            )  # CPU: RNG states must stay CPU tensors
        if plan.mode == "eager":
            train_epoch: Callable[[Any], float] = lambda bar: _train_epoch(run, step_model, loss, device, bar)  # noqa: E731
        else:
            graph = GraphStep(
                model, loader, run.optimizer, run.scheduler, cfg, teacher=teacher, capture=plan.mode == "captured"
            )
            train_epoch = graph.train_epoch
        _epochs(run, train_epoch, device, val, path, progress, on_epoch)
    return TrainHistory(run.history, plan)


def _epochs(
    run: _Run,
    train_epoch: Callable[[Any], float],
    device: torch.device,
    val: Any,
    path: Path | None,
    progress: bool | None,
    on_epoch: Callable[[dict[str, float]], bool | None] | None,
) -> None:
    cfg = run.cfg
    bar = None
    if _show_progress(progress):
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.epochs * len(run.loader),
            initial=len(run.history) * len(run.loader),
            desc=progress_label(),
            unit="step",
            leave=False,
        )
    try:
        for epoch in range(len(run.history), cfg.epochs):
            run.loader.set_epoch(epoch)
            mean_loss = train_epoch(bar)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training diverged in epoch {epoch} (loss {mean_loss}); lower the lr")
            entry = {"epoch": epoch, "loss": mean_loss, "lr": float(run.optimizer.param_groups[0]["lr"])}
            if val is not None:
                metrics = evaluate(run.model, val, device=device, batch_size=cfg.eval_batch_size, amp=cfg.amp)
                entry.update(val_top1=metrics["top1"], val_loss=metrics["loss"])
            run.history.append(entry)
            if path is not None:
                ckpt.atomic_save(run.state_dict(), path)
            if bar is not None:
                val_text = {"val": f"{entry['val_top1']:.3f}"} if val is not None else {}
                bar.set_postfix({"loss": f"{mean_loss:.3f}", **val_text})
            if on_epoch is not None and on_epoch(dict(entry)):
                break
    finally:
        if bar is not None:
            bar.close()
