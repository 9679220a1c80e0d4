"""The final phase shared by every method: fine-tune the chosen subnet and measure it.

Every finalized record says how it was trained, so that only equally-treated subnets are ever
ranked together: ``source["recipe"]`` (the training recipe: epochs, schedule, lr, KD weight, ...),
``source["recipe_tag"]`` (a short readable form of it), ``source["recipe_hash"]`` (a stable
hash, part of the sweep's final-phase cache key), ``source["init"]`` (``"inherited"``: started
from the weights the method gave the subnet; ``"scratch"``: a seeded fresh init) and
``source["robust_suite"]`` (the version of the corruption suite behind ``robust_top1``) and
``source["train_step"]`` (how the fine-tune's steps ran: ``mode`` captured/uncaptured/eager,
``reason``, ``last_batch`` dropped/padded/none).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import torch

from .. import models
from ..engine import latency as latency_mod
from ..engine.robust import ROBUST_SUITE_VERSION, robust_accuracy
from ..engine.train import TrainConfig, evaluate, fit
from ..models.base import spec_hash
from .base import FinalResult, Method, RunContext, SubnetRecord


def finetune_config(ctx: RunContext) -> TrainConfig:
    """The context's fine-tune recipe with the run's KD weight and temperature applied."""
    base = ctx.finetune if ctx.finetune is not None else TrainConfig()
    return base.model_copy(update={"kd_weight": ctx.kd_weight, "kd_temperature": ctx.kd_temperature})


# TrainConfig fields that do not change what is learned (numerics aside): left out of the recipe.
_NOT_RECIPE = ("amp", "channels_last", "compile", "eval_batch_size")


def recipe_of(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe of a training config as plain JSON: every field that shapes the training."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_RECIPE}


def recipe_tag(recipe: dict[str, Any]) -> str:
    """A short readable form of a recipe, e.g. ``e10 cosine lr0.05 bs64 kd0.9``."""
    sched = recipe.get("schedule", "cosine")
    if sched == "step" and recipe.get("milestones"):
        sched += "@" + ",".join(str(m) for m in recipe["milestones"])
    return (
        f"e{recipe.get('epochs')} {sched} lr{recipe.get('lr'):g} bs{recipe.get('batch_size')} "
        f"kd{recipe.get('kd_weight', 0.0):g}"
    )


def recipe_hash(recipe: dict[str, Any]) -> str:
    """A stable 12-hex-digit hash of a recipe (equal recipes, equal hashes)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def preprocessing(ds: Any) -> dict[str, Any]:
    """The exact input a model trained on ``ds`` expects: uint8 pixels / 255, then per channel
    ``(x - mean) / std``, NCHW, RGB channel order (grey images repeated over the channels); and
    ``class_names`` (logit ``i`` is class ``class_names[i]``) for a dataset that names its classes."""
    out = {
        "input_size": int(ds.input_size),
        "channels": int(ds.channels),
        "layout": "NCHW",
        "channel_order": "RGB",
        "scale": "pixel / 255",
        "mean": [float(m) for m in ds.mean],
        "std": [float(s) for s in ds.std],
    }
    if getattr(ds, "class_names", None):
        out["class_names"] = [str(c) for c in ds.class_names]
    return out


def data_source(ds: Any) -> dict[str, Any]:
    """How the training images were fed, for a dataset that has more than one way
    (imagefolder: ``{"data_loading": "memory"}`` or ``"stream"``); else nothing."""
    loading = getattr(ds, "loading", None)
    return {"data_loading": loading} if loading else {}


def measure(model: torch.nn.Module, ctx: RunContext, eval_batch_size: int = 512) -> dict[str, float]:
    """What every finalized subnet (and the unpruned baseline) is measured on: test top-1/top-5
    and loss, robust accuracy (``ctx.robust``) and latency (``ctx.measure_latency``)."""
    return measure_with_latency(model, ctx, eval_batch_size)[0]


def measure_with_latency(
    model: torch.nn.Module, ctx: RunContext, eval_batch_size: int = 512
) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`measure`'s metrics and, when latency was measured, its setting (backend, device,
    threads, node, ...: what a record keeps in ``source["latency"]``), else ``{}``."""
    test = evaluate(model, ctx.test, device=ctx.device, batch_size=eval_batch_size)
    metrics = {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"]}
    if ctx.robust:
        metrics.update(
            robust_accuracy(model, ctx.test, device=ctx.device, seed=ctx.seed, max_samples=ctx.robust_max_samples)
        )
    setting: dict[str, Any] = {}
    if ctx.measure_latency:
        records = _latency_records(model, ctx)
        metrics.update(latency_mod.latency_metrics(records))
        setting = latency_mod.latency_setting(records)
    return {k: float(v) for k, v in metrics.items()}, setting


def _latency_records(model: torch.nn.Module, ctx: RunContext) -> list[latency_mod.LatencyRecord]:
    """``model``'s latency at the context's input shape, batch sizes and number of timed calls,
    in passes like the sweep's isolated measurement (:func:`~rayprune.engine.latency.measure_interleaved`)."""
    passes, repeats = latency_mod.split_calls(ctx.latency_repeats)
    shape = (ctx.test.channels, ctx.test.input_size, ctx.test.input_size)
    return latency_mod.measure_interleaved(
        {"subnet": model},
        shape,
        device=ctx.device,
        batch_sizes=ctx.latency_batch_sizes,
        passes=passes,
        repeats=repeats,
    )["subnet"]


def finetune_subnet(
    record: SubnetRecord,
    ctx: RunContext,
    init_state: dict[str, torch.Tensor] | None = None,
    progress: bool | None = None,
) -> FinalResult:
    """Build ``record.spec`` (from ``init_state`` or from scratch), train it with the shared engine
    (KD from ``ctx.teacher`` when ``ctx.kd_weight > 0``) and report test top-1/top-5, robust
    accuracy, MACs, params and latency."""
    with torch.random.fork_rng(devices=[]):  # fresh-init weights depend on the run's seed only
        torch.manual_seed(ctx.seed)
        model = models.build(record.spec)
    if init_state is not None:
        model.load_state_dict(init_state)
    cfg = finetune_config(ctx)
    teacher = ctx.teacher if ctx.kd_weight > 0 else None
    # Keyed by the subnet: a resumed run that chose another subnet must not load this one's state.
    ckpt = ctx.workdir / "finetune" / spec_hash(record.spec) if ctx.workdir is not None else None
    history = fit(
        model,
        ctx.train,
        cfg,
        device=ctx.device,
        teacher=teacher,
        seed=ctx.seed,
        checkpoint_dir=ckpt,
        progress=progress if progress is not None else ctx.progress,
    )
    metrics = dict(record.metrics)
    if history:
        metrics["finetune_loss"] = float(history[-1]["loss"])
    measured, latency = measure_with_latency(model, ctx, cfg.eval_batch_size)
    metrics.update(measured)
    recipe = recipe_of(cfg)
    final = replace(
        record,
        metrics={k: float(v) for k, v in metrics.items()},
        source={
            **record.source,
            "finetuned": True,
            "init": "inherited" if init_state is not None else "scratch",
            "recipe": recipe,
            "recipe_tag": recipe_tag(recipe),
            "recipe_hash": recipe_hash(recipe),
            "robust_suite": ROBUST_SUITE_VERSION if ctx.robust else None,
            "preprocessing": preprocessing(ctx.test),
            **data_source(ctx.train),
            "train_step": history.step.as_record(),  # captured or eager, and why
            **({"latency": latency} if latency else {}),
        },
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return FinalResult(record=final, state_dict=state)


def finalize(method: Method, progress: bool | None = None) -> FinalResult:
    """The final phase of a run: fine-tune ``method``'s chosen subnet (``best()``) with the
    shared engine, from the weights the method gives it (``initial_weights``), KD with
    ``ctx.kd_weight``; returns its record (test, robust accuracy, latency) and weights."""
    record = method.best()
    return finetune_subnet(record, method.ctx, method.initial_weights(record), progress=progress)
