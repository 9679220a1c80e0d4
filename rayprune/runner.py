"""One method run as a plain-torch trial (no Ray): what `rayprune run` does, and the trial
driver (step -> checkpoint -> report, one state-file schema) that the Ray trainable shares. Also teacher training; the saved-subnet format is :mod:`rayprune.models.io`."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from . import models
from .engine.checkpoint import atomic_save, load
from .engine.data import holdout_per_class, load_dataset
from .engine.train import TrainConfig, evaluate, fit
from .engine.utils import resolve_device
from .methods import Budget, Method, RunContext, StepResult, SubnetRecord, get_method
from .methods.finetune import finalize
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
# The trial driver: step -> checkpoint -> report, for `rayprune run` and the Tune trainable
# ---------------------------------------------------------------------------------------------

STATE_FILE = "state.pt"
# Fields that may change between an interrupted run and its resumption (they do not shape the search).
RESUMABLE_CHANGES = {"max_steps", "device", "robust", "measure_latency"}


@dataclass
class TrialState:
    """A trial checkpoint (``state.pt``, the one schema of ``rayprune run`` and the Tune
    trainable): the method's ``state_dict``, the steps done, each step's metrics, every subnet
    record evaluated so far, and the settings that shape the search (``None``: not checked)."""

    method: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    subnets: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None

    def advance(self, method: Method, result: StepResult) -> None:
        """Record one finished step of ``method``."""
        self.method = method.state_dict()
        self.steps += 1
        self.history.append({"step": result.step, **result.metrics})
        self.subnets += [r.to_dict() for r in result.subnets]

    def save(self, path: str | Path) -> Path:
        return atomic_save({"method": self.method, "steps": self.steps, "history": self.history,
                            "subnets": self.subnets, "config": self.config}, path)

    @classmethod
    def load(cls, path: str | Path) -> "TrialState":
        """Read ``path`` (``weights_only``); older files lack some fields (their defaults apply)."""
        saved = load(path)
        history = saved.get("history", [])
        return cls(method=saved["method"], steps=int(saved.get("steps", len(history))), history=history,
                   subnets=saved.get("subnets", []), config=saved.get("config"))

    def check_config(self, config: dict[str, Any], path: Path) -> None:
        """Raise ValueError when this state was written with other search-shaping settings."""
        if self.config is not None and self.config != config:
            changed = sorted(k for k in config if self.config.get(k) != config[k])
            raise ValueError(f"{path} was written by a run with other settings ({', '.join(changed)}); "
                             "resume with the same settings, use another --out, or pass --no-resume")


#: ``report(result, state, checkpoint_dir)``: called after each step, once ``state.pt`` is in
#: ``checkpoint_dir`` (Tune attaches that folder to its report).
Reporter = Callable[[StepResult, TrialState, Path], None]


def drive(method: Method, state: TrialState, report: Reporter, *, max_steps: int | None = None,
          checkpoint_dir: Callable[[], ContextManager[Any]]) -> TrialState:
    """The trial loop: step ``method`` until done (or ``max_steps`` steps in all); after each
    step save ``state`` to ``checkpoint_dir()``/state.pt, then ``report`` it. Resume by loading
    ``state.method`` into ``method`` (:func:`restore`) before calling."""
    while not method.done and (max_steps is None or state.steps < max_steps):
        result = method.step()
        state.advance(method, result)
        with checkpoint_dir() as d:
            state.save(Path(d) / STATE_FILE)
            report(result, state, Path(d))
    return state


def restore(method: Method, state: TrialState) -> TrialState:
    """Load a checkpoint's method state into ``method``; returns ``state``."""
    method.load_state_dict(state.method)
    return state


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
    state = TrialState(config=cfg.model_dump(exclude=RESUMABLE_CHANGES))
    if resume and (out / STATE_FILE).exists():
        saved = TrialState.load(out / STATE_FILE)
        saved.check_config(state.config, out / STATE_FILE)
        state = restore(method, replace(saved, config=state.config))
    (out / "config.json").write_text(cfg.model_dump_json(indent=1) + "\n")
    (out / "subnets.jsonl").write_text("")
    _append_jsonl(out / "subnets.jsonl", state.subnets)

    def report(result: StepResult, _: TrialState, __: Path) -> None:
        _append_jsonl(out / "subnets.jsonl", [r.to_dict() for r in result.subnets])
        if on_step is not None:
            on_step(result)

    drive(method, state, report, max_steps=cfg.max_steps, checkpoint_dir=lambda: nullcontext(out))
    final = finalize(method, progress=progress)
    save_subnet(out / "final", final.record.spec, final.state_dict, final.record.to_dict(),
                input_size=method.ctx.input_size)
    result = {"config": cfg.model_dump(), "final": final.record.to_dict(), "steps": state.history,
              "num_subnets": len(state.subnets), "unpruned_macs": models.macs(method.ctx.spec, method.ctx.input_size)}
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
