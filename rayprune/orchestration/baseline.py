"""The sweep's shared references: the KD teacher and the unpruned baseline.

Both are prepared once per sweep, as Ray tasks with the trial resources, and kept on the
sweep's storage, so a resumed sweep trains and measures nothing again:

* :func:`prepare_teacher` -- the configured teacher checkpoint, or the unpruned net trained once
  with ``teacher.recipe`` into ``<experiment>/teacher``;
* :func:`start_baseline` / :func:`finish_baseline` -- the unpruned baseline measured like every
  finalized subnet (test, robust; latency at the end, in isolation), in the sweep's final-phase cache.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import ray

from .. import models
from ..engine.train import TrainConfig
from ..methods.finetune import recipe_hash, recipe_of
from ..models import subnet_io
from ..runner import TrialConfig, build_method, load_subnet, pretrained_start, save_subnet, train_teacher
from .cache import BASELINE_CELL, FinalCache, cache_key
from .config import SweepConfig
from .final_phase import flag_shared_gpu
from .storage import file_exists, is_uri, join, localize, upload_dir


def prepare_teacher(cfg: SweepConfig, experiment_path: str) -> str | None:
    """The teacher every trial shares: the configured checkpoint, or the unpruned net trained
    once (as a Ray task with the trial resources) into ``<experiment>/teacher``; a resumed sweep
    reuses it. On object storage it is uploaded there and each trial downloads it."""
    if cfg.teacher is None:
        return None
    if cfg.teacher.checkpoint is not None:
        return cfg.teacher.checkpoint
    target = join(experiment_path, "teacher")
    if file_exists(join(target, "weights.pt")):
        return target
    print(
        f"Training the teacher once for the whole sweep ({cfg.model or 'spec'} on {cfg.dataset.name}) ...", flush=True
    )
    task = ray.remote(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)(_train_teacher_task)
    spec, state, record = ray.get(task.remote(cfg.model_dump(mode="json")))
    input_size = record.pop("input_size", None)
    if not is_uri(target):
        save_subnet(target, spec, state, record, input_size=input_size)
        return target
    with tempfile.TemporaryDirectory() as d:
        save_subnet(Path(d) / "teacher", spec, state, record, input_size=input_size)
        upload_dir(Path(d) / "teacher", target)
    return target


def _baseline_recipe(cfg: SweepConfig) -> dict[str, Any]:
    """The recipe the unpruned baseline is trained with when the sweep has no teacher."""
    return recipe_of(
        TrainConfig(**cfg.recipes.finetune).model_copy(update={"kd_weight": 0.0, "kd_temperature": cfg.kd_temperature})
    )


def start_baseline(cfg: SweepConfig, experiment_path: str, teacher: str | None) -> tuple[str, Any]:
    """Start measuring the unpruned baseline once per sweep (test, robust), like every
    finalized subnet: the teacher when the sweep has one, otherwise the unpruned net trained
    once with ``recipes.finetune`` (KD 0). A Ray task with the trial resources that runs beside
    the trials and stores its result in the final-phase cache, so a resumed sweep measures
    nothing again. Returns ``(cache key, task ref or None when cached)``."""
    cache = FinalCache.of_experiment(experiment_path)
    origin = "teacher" if teacher is not None else recipe_hash(_baseline_recipe(cfg))
    if teacher is None and cfg.weights is not None:  # trained from the pretrained start: another baseline
        origin += "-w" + hashlib.sha1(cfg.weights.encode()).hexdigest()[:8]
    key = cache_key(BASELINE_CELL, models.spec_hash(cfg.full_spec()), origin, 0.0)
    if key in cache:
        return key, None
    what = "the teacher" if teacher is not None else "the unpruned net, trained once with recipes.finetune"
    print(f"Measuring the unpruned baseline beside the trials: {what} ...", flush=True)
    task = ray.remote(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)(_baseline_task)
    return key, task.remote(cfg.model_dump(mode="json"), teacher, cache.root, key)


def finish_baseline(experiment_path: str, teacher: str | None, key: str, ref: Any) -> dict[str, Any]:
    """The baseline's record once its task (if any) is done."""
    if ref is not None:
        ray.get(ref)
    cached = FinalCache.of_experiment(experiment_path).get(key)
    assert cached is not None  # the baseline task (or an earlier run) put it there
    record = cached[0]
    return {**record, "method": "unpruned", "step": 0, "source": {**record.get("source", {}), "teacher": teacher}}


def _baseline_task(cfg_dump: dict[str, Any], teacher: str | None, cache_root: str, key: str) -> None:
    """Ray task body of :func:`start_baseline`: measure (or train, then measure) the unpruned net."""
    from ..engine.robust import ROBUST_SUITE_VERSION
    from ..methods import SubnetRecord
    from ..methods.finetune import finetune_subnet, measure, preprocessing

    cfg = SweepConfig.model_validate(cfg_dump)
    tc = TrialConfig(
        method="uniform",
        model=cfg.model,
        spec=spec_or_none(cfg),
        shortcut=cfg.shortcut,
        dataset=cfg.dataset.name,
        data_dir=cfg.dataset.data_dir,
        dataset_options=cfg.dataset.options(),
        flops_target=1.0,
        seed=cfg.seed,
        device=cfg.device,
        finetune=dict(cfg.recipes.finetune),
        kd_temperature=cfg.kd_temperature,
        input_size=cfg.input_size,
        # beside the trials it would time their load: with a fine-tuned front, measure_finalists times it alone
        measure_latency=not cfg.finetune_front,
    )
    with tempfile.TemporaryDirectory() as work:
        ctx = build_method(tc, Path(work) / "method").ctx
        if teacher is not None:
            spec, net = load_subnet(localize(teacher, Path(work) / "teacher"))
            record = SubnetRecord.of(
                spec,
                measure(net.to(ctx.device), ctx),
                "unpruned",
                0,
                ctx.input_size,
                init="teacher",
                preprocessing=preprocessing(ctx.test),
                robust_suite=ROBUST_SUITE_VERSION,
            )
            state = net.state_dict()
        else:
            full = SubnetRecord.of(ctx.spec, {}, "unpruned", 0, ctx.input_size)
            start = pretrained_start(ctx.spec, cfg.weights, cfg.seed) if cfg.weights else None
            result = finetune_subnet(full, ctx, start, progress=False)
            record, state = result.record, result.state_dict
    record.source["trained_by"] = "baseline"
    flag_shared_gpu(record)
    FinalCache(cache_root).put(key, record.to_dict(), state)


def _train_teacher_task(cfg_dump: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Ray task body: train the unpruned net with ``teacher.recipe``; return spec, weights, metrics."""
    cfg = SweepConfig.model_validate(cfg_dump)
    assert cfg.teacher is not None  # prepare_teacher starts this task for a configured teacher only
    with tempfile.TemporaryDirectory() as d:
        out = train_teacher(
            cfg.model,
            cfg.dataset.name,
            Path(d) / "teacher",
            spec=spec_or_none(cfg),
            shortcut=cfg.shortcut,
            data_dir=cfg.dataset.data_dir,
            dataset_options=cfg.dataset.options(),
            input_size=cfg.input_size,
            seed=cfg.seed,
            device=cfg.device,
            recipe=cfg.teacher.recipe,
            progress=False,
            weights=cfg.weights,
        )
        saved = subnet_io.load(out)
        return saved.spec, saved.state_dict, {**saved.record, "input_size": saved.input_size}


def spec_or_none(cfg: SweepConfig) -> dict | None:
    return cfg.spec if isinstance(cfg.spec, dict) else None
