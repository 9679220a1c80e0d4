"""One method run as a plain-torch trial (no Ray): what `rayprune run` does, and what a Ray
trial wraps. Also teacher training; the saved-subnet format is :mod:`rayprune.models.io`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from . import models
from .engine.checkpoint import atomic_save, load
from .engine.data import holdout_per_class, load_dataset
from .engine.train import TrainConfig, evaluate, fit
from .engine.utils import resolve_device
from .methods import Budget, Method, RunContext, StepResult, SubnetRecord, get_method
from .models import io as subnet_io
from .models.base import Spec


class TrialConfig(BaseModel):
    """Everything that defines one method run. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    method: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    model: str | None = None  # "family:variant", e.g. "cifar_resnet:56"
    spec: dict[str, Any] | None = None  # or an explicit (possibly pruned) spec
    shortcut: str | None = None  # cifar_resnet shortcut kind for `model`
    dataset: str = "cifar10"
    data_dir: str | None = None
    flops_target: float = Field(gt=0.0, le=1.0)
    kd_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    kd_temperature: float = Field(default=4.0, gt=0.0)
    max_stage_prune: list[float] | None = None
    seed: int = 0
    device: str | None = None
    finetune: dict[str, Any] = Field(default_factory=dict)
    teacher: str | None = None  # a saved subnet dir (spec.json + weights.pt)
    input_size: int | None = None
    max_steps: int | None = Field(default=None, ge=1)
    robust: bool = True
    measure_latency: bool = True
    train_subset: int | None = Field(default=None, ge=2)  # class-balanced, seeded subsets for quick runs
    test_subset: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _model_or_spec(self) -> "TrialConfig":
        if (self.model is None) == (self.spec is None):
            raise ValueError("give exactly one of 'model' (FAMILY:VARIANT) or 'spec' (a JSON spec)")
        return self


# ---------------------------------------------------------------------------------------------
# Saved subnets
# ---------------------------------------------------------------------------------------------


def save_subnet(out_dir: str | Path, spec: Spec, state_dict: dict[str, torch.Tensor],
                metrics: dict[str, Any] | None = None, *, input_size: int | None = None) -> Path:
    """Write a saved subnet folder (see :mod:`rayprune.models.io`)."""
    return subnet_io.save(out_dir, spec, state_dict, metrics, input_size=input_size)


def load_subnet(path: str | Path) -> tuple[Spec, nn.Module]:
    """Rebuild a saved subnet from its spec and weights (weights_only: nothing is unpickled)."""
    saved = subnet_io.load(path)
    return saved.spec, saved.build()


# ---------------------------------------------------------------------------------------------
# Building a method from a TrialConfig
# ---------------------------------------------------------------------------------------------


def resolve_spec(cfg: TrialConfig, num_classes: int) -> Spec:
    return network_spec(cfg.model, cfg.spec, cfg.shortcut, cfg.dataset, num_classes)


def network_spec(model: str | None, spec: Spec | None, shortcut: str | None, dataset: str, num_classes: int) -> Spec:
    """The explicit ``spec`` (checked against the dataset's classes), else ``model``'s unpruned spec."""
    if spec is not None:
        spec = models.validate(dict(spec))
        if spec.get("num_classes") != num_classes:
            raise models.SpecError(f"spec field 'num_classes' is {spec.get('num_classes')} but dataset "
                                   f"{dataset!r} has {num_classes} classes")
        return spec
    if model is None:
        raise models.SpecError("give exactly one of 'model' (FAMILY:VARIANT) or 'spec' (a JSON spec)")
    return models.full_spec(model, num_classes=num_classes, **({"shortcut": shortcut} if shortcut else {}))


def load_teacher(path: str | Path, spec: Spec, device: str) -> nn.Module:
    saved = subnet_io.load(path)
    if saved.spec.get("num_classes") != spec.get("num_classes"):
        raise ValueError(f"teacher at {path} predicts {saved.spec.get('num_classes')} classes, "
                         f"the run needs {spec.get('num_classes')}")
    return saved.build().to(device).eval()


def class_balanced_subset(ds: Any, n: int | None, seed: int) -> Any:
    """``n`` samples (n // classes per class, seeded) of ``ds``; all of it when ``n`` is None."""
    if n is None or n >= len(ds):
        return ds
    _, picked = holdout_per_class(ds.labels, max(1, n // ds.num_classes), seed)
    return ds.subset(picked)


def load_data(dataset: str, data_dir: str | None, train_subset: int | None = None,
              test_subset: int | None = None, seed: int = 0) -> tuple[Any, Any]:
    train, test = load_dataset(dataset, data_dir)
    return class_balanced_subset(train, train_subset, seed), class_balanced_subset(test, test_subset, seed)


def build_method(cfg: TrialConfig, workdir: str | Path) -> Method:
    """Load data and teacher, build the RunContext and the method (hparams validated)."""
    cls = get_method(cfg.method)
    hparams = cls.Hparams(**cfg.hparams)
    device = resolve_device(cfg.device)
    # Subsets are drawn with a fixed seed so every trial of a sweep sees the same samples.
    train, test = load_data(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset)
    spec = resolve_spec(cfg, train.num_classes)
    teacher = load_teacher(cfg.teacher, spec, device) if cfg.teacher else None
    ctx = RunContext(
        spec=spec, train=train, test=test,
        budget=Budget(flops_target=cfg.flops_target, max_stage_prune=cfg.max_stage_prune),
        kd_weight=cfg.kd_weight, kd_temperature=cfg.kd_temperature, teacher=teacher, device=device,
        seed=cfg.seed, workdir=Path(workdir), finetune=TrainConfig(**cfg.finetune),
        input_size=cfg.input_size or train.input_size, robust=cfg.robust, measure_latency=cfg.measure_latency)
    return cls(ctx, hparams)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

STATE_FILE = "state.pt"
# Fields that may change between an interrupted run and its resumption (they do not shape the search).
RESUMABLE_CHANGES = {"max_steps", "device", "robust", "measure_latency"}


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def run_trial(cfg: TrialConfig, out_dir: str | Path, *, resume: bool = True, progress: bool | None = None,
              on_step: Callable[[StepResult], None] | None = None) -> dict[str, Any]:
    """Step a method until done, checkpointing after every step; then fine-tune and save.

    Writes ``out_dir``/config.json, subnets.jsonl (every evaluated subnet), state.pt (resume
    point), final/ (spec.json, weights.pt, metrics.json) and result.json. Interrupted runs resume
    from state.pt with nothing lost or duplicated (subnets.jsonl is rewritten from the state).

    Raises:
        ValueError: state.pt was written with settings that shape the search (method, hparams,
            data, budget, seed, ...) other than ``cfg``'s; only :data:`RESUMABLE_CHANGES` may differ.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = build_method(cfg, out / "work")
    subnets: list[dict[str, Any]] = []
    history: list[dict[str, float]] = []
    search_config = cfg.model_dump(exclude=RESUMABLE_CHANGES)
    if resume and (out / STATE_FILE).exists():
        saved = load(out / STATE_FILE)
        if saved.get("config", search_config) != search_config:
            changed = sorted(k for k in search_config if saved["config"].get(k) != search_config[k])
            raise ValueError(f"{out / STATE_FILE} was written by a run with other settings ({', '.join(changed)}); "
                             "resume with the same settings, use another --out, or pass --no-resume")
        method.load_state_dict(saved["method"])
        subnets, history = saved["subnets"], saved["history"]
    (out / "config.json").write_text(cfg.model_dump_json(indent=1) + "\n")
    (out / "subnets.jsonl").write_text("")
    _append_jsonl(out / "subnets.jsonl", subnets)
    while not method.done and (cfg.max_steps is None or len(history) < cfg.max_steps):
        result = method.step()
        rows = [r.to_dict() for r in result.subnets]
        subnets += rows
        history.append({"step": result.step, **result.metrics})
        atomic_save({"method": method.state_dict(), "subnets": subnets, "history": history, "config": search_config},
                    out / STATE_FILE)
        _append_jsonl(out / "subnets.jsonl", rows)
        if on_step is not None:
            on_step(result)
    final = method.finalize(progress=progress)
    save_subnet(out / "final", final.record.spec, final.state_dict, final.record.to_dict(),
                input_size=method.ctx.input_size)
    result = {"config": cfg.model_dump(), "final": final.record.to_dict(), "steps": history,
              "num_subnets": len(subnets), "unpruned_macs": models.macs(method.ctx.spec, method.ctx.input_size)}
    (out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def train_teacher(model: str | None, dataset: str, out_dir: str | Path, *, spec: Spec | None = None,
                  shortcut: str | None = None, data_dir: str | None = None, seed: int = 0, device: str | None = None,
                  recipe: dict[str, Any] | None = None, progress: bool | None = None,
                  train_subset: int | None = None, test_subset: int | None = None) -> Path:
    """Train the unpruned network once and save it (spec.json + weights.pt + metrics.json).

    An existing complete teacher in ``out_dir`` is reused, so a resumed sweep never retrains it.
    """
    out_dir = Path(out_dir)
    if subnet_io.is_saved(out_dir):
        return out_dir
    device = resolve_device(device)
    train, test = load_data(dataset, data_dir, train_subset, test_subset)
    full = network_spec(model, spec, shortcut, dataset, train.num_classes)
    net = models.build(full, seed=seed)  # same init as manual_seed(seed), without reseeding the process
    fit(net, train, TrainConfig(**(recipe or {})), device=device, seed=seed,
        checkpoint_dir=out_dir.parent / f".{out_dir.name}.ckpt", progress=progress)
    metrics = {f"test_{k}": v for k, v in evaluate(net, test, device=device).items()}
    record = SubnetRecord.of(full, metrics, "unpruned", 0, train.input_size, trained_by="teacher")
    save_subnet(out_dir, full, net.state_dict(), record.to_dict(), input_size=train.input_size)
    shutil.rmtree(out_dir.parent / f".{out_dir.name}.ckpt", ignore_errors=True)
    return out_dir
