"""The final phase shared by every method: fine-tune the chosen subnet and measure it."""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import models
from ..models.base import spec_hash
from ..engine import latency as latency_mod
from ..engine.robust import robust_accuracy
from ..engine.train import TrainConfig, evaluate, fit
from .base import FinalResult, RunContext, SubnetRecord


def finetune_config(ctx: RunContext) -> TrainConfig:
    """The context's fine-tune recipe with the run's KD weight and temperature applied."""
    base = ctx.finetune if ctx.finetune is not None else TrainConfig()
    return base.model_copy(update={"kd_weight": ctx.kd_weight, "kd_temperature": ctx.kd_temperature})


def finetune_subnet(record: SubnetRecord, ctx: RunContext, init_state: dict[str, torch.Tensor] | None = None,
                    progress: bool | None = None) -> FinalResult:
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
    history = fit(model, ctx.train, cfg, device=ctx.device, teacher=teacher, seed=ctx.seed, checkpoint_dir=ckpt,
                  progress=progress if progress is not None else ctx.progress)
    metrics = dict(record.metrics)
    test = evaluate(model, ctx.test, device=ctx.device, batch_size=cfg.eval_batch_size)
    metrics.update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"])
    if history:
        metrics["finetune_loss"] = float(history[-1]["loss"])
    if ctx.robust:
        metrics.update(robust_accuracy(model, ctx.test, device=ctx.device, seed=ctx.seed,
                                       max_samples=ctx.robust_max_samples))
    if ctx.measure_latency:
        shape = (ctx.test.channels, ctx.test.input_size, ctx.test.input_size)
        metrics.update(latency_mod.measure_latency(model, shape, device=ctx.device, batch_sizes=ctx.latency_batch_sizes,
                                                   repeats=ctx.latency_repeats))
    final = replace(record, metrics={k: float(v) for k, v in metrics.items()},
                    source={**record.source, "finetuned": True, "init": "inherited" if init_state else "scratch"})
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return FinalResult(record=final, state_dict=state)
