"""One method run as a plain-torch trial (no Ray): what `rayprune run` does, and the trial
driver (step -> checkpoint -> report, one state-file schema) that the Ray trainable shares. Also
teacher training; the saved-subnet format is :mod:`rayprune.models.subnet_io`."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from . import models
from .engine.checkpoint import UnreadableFileError, atomic_save, safe_load
from .engine.data import holdout_per_class, load_dataset
from .engine.progress import phase
from .engine.train import TrainConfig, evaluate, fit
from .engine.utils import resolve_device
from .errors import InputError, validated
from .methods import Budget, Method, RunContext, StepResult, SubnetRecord, get_method
from .methods.finetune import finalize
from .models import subnet_io
from .models.base import Spec
from .models.weights import apply_weights


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
    dataset_options: dict[str, Any] = Field(default_factory=dict)  # the dataset's own settings (imagefolder's)
    flops_target: float = Field(gt=0.0, le=1.0)
    kd_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    kd_temperature: float = Field(default=4.0, gt=0.0)
    max_stage_prune: list[float] | None = None
    allocation: list[float] | None = None  # per-stage shares of the pruning (methods whose budget_use is "allocation")
    seed: int = 0
    device: str | None = None
    finetune: dict[str, Any] = Field(default_factory=dict)
    teacher: str | None = None  # a saved subnet dir (spec.json + weights.pt)
    weights: str | None = None  # the unpruned net's start: a state_dict file or torchvision:DEFAULT
    input_size: int | None = None
    max_steps: int | None = Field(default=None, ge=1)
    robust: bool = True
    measure_latency: bool = True
    train_subset: int | None = Field(default=None, ge=2)  # class-balanced, seeded subsets for quick runs
    test_subset: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _model_or_spec(self) -> TrialConfig:
        if (self.model is None) == (self.spec is None):
            raise ValueError("give exactly one of 'model' (FAMILY:VARIANT) or 'spec' (a JSON spec)")
        return self


# ---------------------------------------------------------------------------------------------
# Saved subnets
# ---------------------------------------------------------------------------------------------


def save_subnet(
    out_dir: str | Path,
    spec: Spec,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, Any] | None = None,
    *,
    input_size: int | None = None,
) -> Path:
    """Write a saved subnet folder (see :mod:`rayprune.models.subnet_io`). ``input_size``, the side the
    subnet was trained and measured at, goes into its metrics.json: export, the ONNX input and the
    MLflow signature read it from there. Give it for every subnet a user may export."""
    return subnet_io.save(out_dir, spec, state_dict, metrics, input_size=input_size)


def load_subnet(path: str | Path) -> tuple[Spec, nn.Module]:
    """Rebuild a saved subnet from its spec and weights (weights_only: nothing is unpickled)."""
    saved = subnet_io.load(path)
    return saved.spec, saved.build()


# ---------------------------------------------------------------------------------------------
# Building a method from a TrialConfig
# ---------------------------------------------------------------------------------------------


def resolve_spec(cfg: TrialConfig, num_classes: int, input_size: int | None = None) -> Spec:
    return network_spec(cfg.model, cfg.spec, cfg.shortcut, cfg.dataset, num_classes, input_size)


def network_spec(
    model: str | None,
    spec: Spec | None,
    shortcut: str | None,
    dataset: str,
    num_classes: int,
    input_size: int | None = None,
) -> Spec:
    """The explicit ``spec`` (checked against the dataset's classes), else ``model``'s unpruned spec
    (a traced source traced at ``input_size``)."""
    if spec is not None:
        spec = models.validate(dict(spec))
        if spec.get("num_classes") != num_classes:
            raise models.SpecError(
                f"spec field 'num_classes' is {spec.get('num_classes')} but dataset "
                f"{dataset!r} has {num_classes} classes"
            )
        return spec
    if model is None:
        raise models.SpecError("give exactly one of 'model' (FAMILY:VARIANT) or 'spec' (a JSON spec)")
    options = {"shortcut": shortcut} if shortcut else {}
    return models.full_spec(model, num_classes=num_classes, input_size=input_size, **options)


def load_teacher(path: str | Path, spec: Spec, device: str | torch.device) -> nn.Module:
    saved = subnet_io.load(path)
    if saved.spec.get("num_classes") != spec.get("num_classes"):
        raise InputError(
            f"teacher at {path} predicts {saved.spec.get('num_classes')} classes, "
            f"the run needs {spec.get('num_classes')}"
        )
    return saved.build().to(device).eval()


def class_balanced_subset(ds: Any, n: int | None, seed: int, what: str = "subset") -> Any:
    """``n`` samples (n // classes per class, seeded) of ``ds``; all of it when ``n`` is None or
    at least its size (then a one-line warning on stderr says so, naming ``what``)."""
    if n is not None and n > len(ds):
        print(
            f"rayprune: warning: {what} {n} is larger than the set ({len(ds)} samples); using all of it",
            file=sys.stderr,
            flush=True,
        )
    if n is None or n >= len(ds):
        return ds
    _, picked = holdout_per_class(ds.labels, max(1, n // ds.num_classes), seed)
    return ds.subset(picked)


def load_data(
    dataset: str,
    data_dir: str | None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    *,
    input_size: int | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """``(train, test)`` of ``dataset``, with class-balanced subsets when asked; ``input_size`` and
    ``options`` go to a dataset that takes them (see :func:`~rayprune.engine.data.load_dataset`)."""
    train, test = load_dataset(dataset, data_dir, input_size=input_size, **(options or {}))
    return (
        class_balanced_subset(train, train_subset, seed, "--train-subset"),
        class_balanced_subset(test, test_subset, seed, "--test-subset"),
    )


def trial_data(cfg: TrialConfig) -> tuple[Any, Any]:
    """The ``(train, test)`` data of a trial."""
    return load_data(
        cfg.dataset,
        cfg.data_dir,
        cfg.train_subset,
        cfg.test_subset,
        input_size=cfg.input_size,
        options=cfg.dataset_options,
    )


def build_method(
    cfg: TrialConfig,
    workdir: str | Path,
    *,
    data: tuple[Any, Any] | None = None,
    teacher: nn.Module | None = None,
    progress: bool | None = None,
) -> Method:
    """Load data and teacher, build the RunContext and the method (hparams validated).

    Writes nothing (a method writes into ``workdir`` only when it steps). ``data`` (``(train,
    test)`` as :func:`load_data` returns them) and ``teacher`` skip loading those again.
    ``progress``: the training bars (None: only on a terminal).
    """
    cls = get_method(cfg.method)
    hparams = validated(cls.Hparams, cfg.hparams)
    device = resolve_device(cfg.device)
    finetune = validated(TrainConfig, cfg.finetune)
    # Subsets are drawn with a fixed seed so every trial of a sweep sees the same samples.
    train, test = data if data is not None else trial_data(cfg)
    spec = resolve_spec(cfg, train.num_classes, cfg.input_size or train.input_size)
    initial_state = pretrained_state(cls, spec, cfg.weights, cfg.seed) if cfg.weights else None
    if teacher is None and cfg.teacher:
        teacher = load_teacher(cfg.teacher, spec, device)
    ctx = RunContext(
        spec=spec,
        train=train,
        test=test,
        budget=validated(
            Budget,
            {"flops_target": cfg.flops_target, "max_stage_prune": cfg.max_stage_prune, "allocation": cfg.allocation},
        ),
        kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature,
        teacher=teacher,
        device=device,
        seed=cfg.seed,
        workdir=Path(workdir),
        finetune=finetune,
        input_size=cfg.input_size or train.input_size,
        robust=cfg.robust,
        measure_latency=cfg.measure_latency,
        progress=progress,
        initial_state=initial_state,
    )
    return cls(ctx, hparams)


def pretrained_state(cls: type[Method], spec: Spec, weights: str, seed: int) -> dict[str, torch.Tensor]:
    """The unpruned net's state started from ``weights`` (its head re-initialised when it does not fit)."""
    if not cls.inherits_weights:
        raise InputError(
            f"{cls.name} trains its subnets from scratch, so pretrained weights would not reach them; "
            "drop the weights or use l1, fpgm, random or ast",
            option="weights",
        )
    return pretrained_start(spec, weights, seed)


def pretrained_start(spec: Spec, weights: str, seed: int) -> dict[str, torch.Tensor]:
    """The state of the unpruned net of ``spec`` loaded from ``weights`` (a head that does not fit
    is re-initialised from ``seed``, with one line on stderr that says so)."""
    net = models.build(spec, seed=seed)
    note = apply_weights(net, spec, weights)
    if note:
        print(f"rayprune: {note}", file=sys.stderr, flush=True)
    return net.state_dict()


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
        return atomic_save(
            {
                "method": self.method,
                "steps": self.steps,
                "history": self.history,
                "subnets": self.subnets,
                "config": self.config,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> TrialState:
        """Read ``path`` (``weights_only``); older files lack some fields (their defaults apply)."""
        saved = safe_load(path, "run state", "delete it to start that run afresh", hint="fresh_start")
        if not isinstance(saved.get("method"), dict) or not isinstance(saved.get("history", []), list):
            raise UnreadableFileError(
                f"cannot read run state {str(path)!r}: it is not a state file rayprune wrote",
                fix="delete it to start that run afresh",
                hint="fresh_start",
            )
        history = saved.get("history", [])
        return cls(
            method=saved["method"],
            steps=int(saved.get("steps", len(history))),
            history=history,
            subnets=saved.get("subnets", []),
            config=saved.get("config"),
        )

    def check_config(self, config: dict[str, Any], path: Path) -> None:
        """Raise InputError when this state was written with other search-shaping settings."""
        if self.config is not None and self.config != config:
            changed = sorted(k for k in config if self.config.get(k) != config[k])
            raise InputError(
                f"{path} was written by a run with other settings ({', '.join(changed)})",
                fix="resume with the same settings, or start afresh in another folder or over this one",
                hint="other_settings",
            )


#: ``report(result, state, checkpoint_dir)``: called after each step, once ``state.pt`` is in
#: ``checkpoint_dir`` (Tune attaches that folder to its report).
Reporter = Callable[[StepResult, TrialState, Path], None]


def step_label(method: Method, steps_done: int) -> str:
    """``search step i/N`` (``search step i`` when the method cannot say how many it plans)."""
    planned = method.planned_steps
    return f"search step {steps_done + 1}" + (f"/{planned}" if planned else "")


def drive(
    method: Method,
    state: TrialState,
    report: Reporter,
    *,
    max_steps: int | None = None,
    checkpoint_dir: Callable[[], AbstractContextManager[Any]],
) -> TrialState:
    """The trial loop: step ``method`` until done (or ``max_steps`` steps in all); after each
    step save ``state`` to ``checkpoint_dir()``/state.pt, then ``report`` it. Resume by loading
    ``state.method`` into ``method`` (:func:`restore`) before calling."""
    while not method.done and (max_steps is None or state.steps < max_steps):
        with phase(step_label(method, state.steps)):
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


def check_out_dir(path: str | Path, option: str = "out_dir") -> Path:
    """``path`` is a folder, or can be created as one; nothing is created.

    Raises:
        InputError: ``path`` (the setting ``option``) is an existing file, or an ancestor is a
            file or not writable.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise InputError(
                f"{option} {str(path)!r} is an existing file, not a folder; give a folder path "
                "(a new one, or a previous run's to resume it)",
                option=option,
            )
        return path
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(
                    f"{option} {str(path)!r} cannot be created: {str(parent)!r} is a file; give a path inside a folder",
                    option=option,
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(
                    f"{option} {str(path)!r} cannot be created: {str(parent)!r} is not writable", option=option
                )
            break
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


TEACHER_DIR = "teacher"


def run_trial(
    cfg: TrialConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool | None = None,
    on_step: Callable[[StepResult], None] | None = None,
    teacher_recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Step a method until done, checkpointing after every step; then fine-tune and save.

    Everything is validated first (options, hparams, recipes, device, data, spec, budget,
    teacher, a previous state in ``out_dir``); only then is ``out_dir`` created. It gets
    config.json, subnets.jsonl (every evaluated subnet), state.pt (resume point), final/
    (spec.json, weights.pt, metrics.json) and result.json; final/, config.json and result.json
    appear atomically. Interrupted runs resume from state.pt with nothing lost or duplicated
    (subnets.jsonl is rewritten from the state).

    ``teacher_recipe``: with ``cfg.kd_weight > 0`` and no ``cfg.teacher``, train the unpruned
    network with this recipe into ``out_dir``/teacher first (after validation; reused on resume).

    Raises:
        InputError: ``out_dir`` is a file; KD without a teacher; or state.pt was written with
            settings that shape the search (method, hparams, data, budget, seed, ...) other than
            ``cfg``'s (only :data:`RESUMABLE_CHANGES` may differ).
    """
    out = check_out_dir(out_dir)
    train_first = cfg.kd_weight > 0 and cfg.teacher is None
    if train_first and teacher_recipe is None:
        raise InputError(
            "kd_weight > 0 (robust mode) needs a teacher",
            fix="give a saved subnet as the teacher, or a recipe to train one first",
            option="kd_weight",
            hint="teacher",
        )
    if train_first:
        assert teacher_recipe is not None  # refused above
        validated(TrainConfig, teacher_recipe)  # a bad recipe fails now, not after the data is loaded
        cfg = cfg.model_copy(update={"teacher": str(out / TEACHER_DIR)})
        train_first = not subnet_io.is_saved(out / TEACHER_DIR)  # a resumed run reuses its teacher
    data = trial_data(cfg)
    # Until the teacher is trained, an untrained net of the same spec stands in for it: the
    # method is built (and so validated) before anything is written.
    full = resolve_spec(cfg, data[0].num_classes, cfg.input_size or data[0].input_size)
    stand_in = models.build(full, seed=cfg.seed).eval() if train_first else None
    method = build_method(cfg, out / "work", data=data, teacher=stand_in, progress=progress)
    # Unset newer fields are left out, so state files that predate them still match.
    unset = {name for name in ("allocation", "weights") if getattr(cfg, name) is None}
    config = cfg.model_dump(exclude=RESUMABLE_CHANGES | unset | (set() if cfg.dataset_options else {"dataset_options"}))
    state = TrialState(config=config)
    saved = None
    if resume and (out / STATE_FILE).exists():
        saved = TrialState.load(out / STATE_FILE)
        saved.check_config(config, out / STATE_FILE)
    out.mkdir(parents=True, exist_ok=True)  # everything checked: from here on, work is kept
    if train_first:
        with phase("teacher"):
            train_teacher(
                cfg.model,
                cfg.dataset,
                out / TEACHER_DIR,
                spec=cfg.spec,
                shortcut=cfg.shortcut,
                data_dir=cfg.data_dir,
                dataset_options=cfg.dataset_options,
                input_size=cfg.input_size,
                seed=cfg.seed,
                device=cfg.device,
                recipe=teacher_recipe,
                progress=progress,
                data=data,
            )
        method = build_method(cfg, out / "work", data=data, progress=progress)
    if saved is not None:
        state = restore(method, replace(saved, config=state.config))
    write_text_atomic(out / "config.json", cfg.model_dump_json(indent=1) + "\n")
    (out / "subnets.jsonl").write_text("")
    _append_jsonl(out / "subnets.jsonl", state.subnets)

    def report(result: StepResult, _: TrialState, __: Path) -> None:
        _append_jsonl(out / "subnets.jsonl", [r.to_dict() for r in result.subnets])
        if on_step is not None:
            on_step(result)

    drive(method, state, report, max_steps=cfg.max_steps, checkpoint_dir=lambda: nullcontext(out))
    with phase("fine-tune"):
        final = finalize(method, progress=progress)
    save_subnet(
        out / "final", final.record.spec, final.state_dict, final.record.to_dict(), input_size=method.ctx.input_size
    )
    result = {
        "config": cfg.model_dump(),
        "final": final.record.to_dict(),
        "steps": state.history,
        "num_subnets": len(state.subnets),
        "unpruned_macs": models.macs(method.ctx.spec, method.ctx.input_size),
        "unpruned": _unpruned_summary(method, cfg.teacher),
    }
    write_text_atomic(out / "result.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def _unpruned_summary(method: Method, teacher: str | None) -> dict[str, Any]:
    """The unpruned net beside the result: its MACs and params, and the teacher's metrics when
    the teacher is the unpruned net (same spec), trained."""
    spec, size = method.ctx.spec, method.ctx.input_size
    metrics = {}
    if teacher is not None and subnet_io.is_saved(teacher):
        saved = subnet_io.load(teacher)
        if models.spec_hash(saved.spec) == models.spec_hash(spec):  # a teacher of another shape is not it
            metrics = saved.metrics
    return {"macs": models.macs(spec, size), "params": models.params(spec), "metrics": metrics}


def train_teacher(
    model: str | None,
    dataset: str,
    out_dir: str | Path,
    *,
    spec: Spec | None = None,
    shortcut: str | None = None,
    data_dir: str | None = None,
    dataset_options: dict[str, Any] | None = None,
    input_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    recipe: dict[str, Any] | None = None,
    progress: bool | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    data: tuple[Any, Any] | None = None,
    weights: str | None = None,
) -> Path:
    """Train the unpruned network once and save it (spec.json + weights.pt + metrics.json).

    An existing complete teacher in ``out_dir`` is reused, so a resumed sweep never retrains it.
    Everything is validated (folder, device, recipe, data, spec) before any training or writing;
    the folder appears atomically when the teacher is done (its training checkpoint lives next to
    it, in ``.<name>.ckpt``, until then). ``data``: ``(train, test)`` already loaded; else
    ``dataset_options`` and ``input_size`` go to a dataset that takes them (imagefolder).

    Raises:
        InputError: ``out_dir`` is a file, or a folder holding something other than a saved subnet.
    """
    out_dir = check_out_dir(out_dir)
    if subnet_io.is_saved(out_dir):
        return out_dir
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(
            f"out_dir {str(out_dir)!r} is a folder that holds files but no saved teacher "
            f"(a saved subnet has {' and '.join(subnet_io.REQUIRED_FILES)}); give a new folder",
            option="out_dir",
        )
    device = resolve_device(device)
    train_cfg = validated(TrainConfig, recipe or {})
    if data is None:
        data = load_data(dataset, data_dir, train_subset, test_subset, input_size=input_size, options=dataset_options)
    train, test = data
    full = network_spec(model, spec, shortcut, dataset, train.num_classes, train.input_size)
    net = models.build(full, seed=seed)  # same init as manual_seed(seed), without reseeding the process
    if weights is not None:  # fine-tuned from a pretrained start
        note = apply_weights(net, full, weights)
        if note:
            print(f"rayprune: {note}", file=sys.stderr, flush=True)
    fit(
        net,
        train,
        train_cfg,
        device=device,
        seed=seed,
        checkpoint_dir=out_dir.parent / f".{out_dir.name}.ckpt",
        progress=progress,
    )
    metrics = {f"test_{k}": v for k, v in evaluate(net, test, device=device).items()}
    record = SubnetRecord.of(full, metrics, "unpruned", 0, train.input_size, trained_by="teacher")
    save_subnet(out_dir, full, net.state_dict(), record.to_dict(), input_size=train.input_size)
    shutil.rmtree(out_dir.parent / f".{out_dir.name}.ckpt", ignore_errors=True)
    return out_dir
