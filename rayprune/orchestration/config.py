"""The sweep file schema (``search_spaces/*.yaml``), validated before Ray starts.

A sweep file says *what* to search (dataset, model, methods and their hyperparameters), the grid
every sweep must cover (FLOPs targets x KD weights), how Optuna picks the per-stage pruning-rate
budgets inside each grid cell, the teacher, the training recipes, the resources per trial and
where results go. :func:`load_sweep` parses and validates it; every problem becomes one
:class:`SweepConfigError` naming the file, the field and the allowed values, e.g.::

    search_spaces/x.yaml: methods[0].name: unknown method 'foo'; known: ast, tas, sp, ...

Relative paths (data dir, spec file, teacher checkpoint, storage path, a ``sqlite:///`` tracking
store) are resolved against the current working directory, once, in the driver: Ray trials run
elsewhere and must only ever see absolute paths.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .. import models
from ..engine.data import DATASETS
from ..engine.imagefolder import ImageFolderOptions
from ..errors import RaypruneError, describe
from ..grid import CellKey
from ..methods import METHODS, MODULES, Budget, get_method
from ..methods.base import BudgetUse
from ..models.base import Spec, SpecError
from ..models.sources import TORCHVISION
from ..registry import UnknownNameError, unknown_name
from ..tracking import SQLITE_PREFIX, sqlite_file
from .storage import is_uri

SAMPLERS = ("tpe", "random", "gp", "nsga2")

if TYPE_CHECKING:
    DatasetName = str
else:  # the registry's names as a Literal: pydantic then names the allowed ones in its error
    DatasetName = Literal[tuple(DATASETS.names())]


class SweepConfigError(RaypruneError):
    """A sweep file is invalid; the message names the file, the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(ImageFolderOptions):
    """Which data the trials use (``data_dir``: where it lives; None: the engine's default), and
    the imagefolder dataset's settings (:class:`~rayprune.engine.imagefolder.ImageFolderOptions`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: DatasetName  # one of engine.data.DATASETS
    data_dir: str | None = None

    @model_validator(mode="after")
    def _options_it_takes(self) -> DatasetConfig:
        given = sorted(self.options())
        takes = DATASETS.get(self.name).options
        wrong = [k for k in given if k not in takes]
        if wrong:
            raise ValueError(f"dataset {self.name!r} has no setting {', '.join(wrong)} (imagefolder's settings)")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Unset settings are left out, so a sweep on another dataset records (and resumes) as before.
        return {k: v for k, v in handler(self).items() if k in ("name", "data_dir") or v is not None}

    def options(self) -> dict[str, Any]:
        """The dataset's own settings that are set (what a trial's ``dataset_options`` holds)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in ("name", "data_dir")}


class MethodEntry(_Strict):
    """One pruning method and its hyperparameters (checked against the method's ``Hparams``)."""

    name: str
    hparams: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in MODULES and name not in METHODS:  # METHODS: also those registered from outside
            raise ValueError(unknown_name("method", name, MODULES))
        return name


class GridConfig(_Strict):
    """The cells every sweep covers: each FLOPs target (fraction of the unpruned MACs) x each KD weight.

    ``flops_targets: auto`` is the front mode (:mod:`.front_mode`): no fixed targets, one
    multi-objective study per (method, KD weight) suggests each trial's target in
    ``target_range``, and ``front_points`` points of each study's Pareto set are fine-tuned.
    """

    flops_targets: list[float] | Literal["auto"] = Field(min_length=1)
    kd_weights: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    target_range: tuple[float, float] = (0.2, 0.9)
    front_points: int = Field(default=8, ge=1)

    @field_validator("flops_targets", mode="before")
    @classmethod
    def _list_or_auto(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            raise ValueError(f"give a list of FLOPs targets in (0, 1], or auto (the front mode), got {v!r}")
        return v

    @field_validator("flops_targets")
    @classmethod
    def _targets(cls, v: list[float] | str) -> list[float] | str:
        if isinstance(v, str):
            return v
        return _unique_in_range(v, 0.0, 1.0, "a FLOPs target must be in (0, 1]", low_open=True)

    @field_validator("target_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        low, high = v
        if not 0.0 < low < high <= 1.0:
            raise ValueError(f"must be [low, high] with 0 < low < high <= 1, got [{low:g}, {high:g}]")
        return v

    @model_validator(mode="after")
    def _front_keys_need_auto(self) -> GridConfig:
        given = sorted({"target_range", "front_points"} & self.model_fields_set)
        if given and not self.front_mode:
            raise ValueError(f"{given[0]} is a front-mode key: set flops_targets: auto, or drop {given[0]}")
        return self

    @model_serializer(mode="wrap")
    def _front_keys_only_in_front_mode(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A grid sweep records (and re-validates in its tasks) its grid as before: no front-mode keys.
        dumped: dict[str, Any] = handler(self)
        if self.front_mode:
            return dumped
        return {k: v for k, v in dumped.items() if k not in ("target_range", "front_points")}

    @property
    def front_mode(self) -> bool:
        """True for ``flops_targets: auto`` (the front mode)."""
        return self.flops_targets == "auto"

    def fixed_targets(self) -> list[float]:
        """The grid's FLOPs targets (none in the front mode)."""
        return [] if isinstance(self.flops_targets, str) else list(self.flops_targets)

    @field_validator("kd_weights")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        return _unique_in_range(v, 0.0, 1.0, "a KD weight must be in [0, 1]")


def _unique_in_range(values: list[float], low: float, high: float, what: str, low_open: bool = False) -> list[float]:
    for x in values:
        if x > high or x < low or (low_open and x == low):
            raise ValueError(f"{what}, got {x}")
    if len(set(values)) != len(values):
        raise ValueError(f"values must be unique, got {values}")
    return values


class OptunaConfig(_Strict):
    """How Optuna chooses the per-stage pruning budgets inside each grid cell.

    ``stage_prune`` holds one ``[low, high]`` range per stage of the model: the maximum fraction
    of a stage's channels a trial may remove is sampled from it. ``samples_per_cell`` trials run
    per (method, FLOPs target, KD weight) cell; ``seed`` makes the sampling reproducible.
    ``allocation`` (on by default): for the methods that take one (l1, fpgm, random) Optuna also
    proposes each stage's share of the pruning, and a method whose budget is its target alone
    (uniform) runs once per cell; off: every method gets the maximum rates only, and
    ``samples_per_cell`` trials (see :mod:`.search`).
    """

    sampler: Literal["tpe", "random", "gp", "nsga2"] = "random"  # bench/budget_search.py: neither gp nor tpe beat it
    seed: int = 0
    samples_per_cell: int = Field(default=1, ge=1)
    n_startup_trials: int = Field(default=4, ge=1)  # per study, random (after the references) before TPE/GP model
    stage_prune: list[tuple[float, float]]
    allocation: bool = True
    trials_per_round: int = Field(default=1, ge=1)  # per open cell and round (see search.StudyRounds)

    @field_validator("stage_prune")
    @classmethod
    def _ranges(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for i, (low, high) in enumerate(v):
            if not 0.0 <= low <= high < 1.0:
                raise ValueError(f"range {i} must satisfy 0 <= low <= high < 1, got [{low}, {high}]")
        return v


class TeacherConfig(_Strict):
    """The KD teacher: a saved subnet dir (``checkpoint``), or trained once per sweep with ``recipe``."""

    checkpoint: str | None = None
    recipe: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.recipe is None):
            raise ValueError(
                "set exactly one of teacher.checkpoint (a saved subnet dir: spec.json + "
                "weights.pt) and teacher.recipe (train the unpruned net once per sweep)"
            )
        return self


class RecipesConfig(_Strict):
    """Engine ``TrainConfig`` fields: ``search`` fine-tunes every trial's chosen subnet (short, it
    ranks trials); ``finetune`` trains the Pareto-front members at the end of the sweep."""

    search: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)


class ResourcesConfig(_Strict):
    """What one trial's Ray actor reserves (fractional GPUs share a device)."""

    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)


class SchedulerConfig(_Strict):
    """Optional ASHA early stopping on ``val_top1`` (in method steps), separately within each cell."""

    type: Literal["asha"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=4.0, gt=1)
    max_t: int = Field(default=10_000, ge=1)


class TrackingConfig(_Strict):
    """Where MLflow runs go (``uri``: ``sqlite:///mlflow.db`` offline, ``http://head:5000`` on a cluster)."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str


class SweepConfig(_Strict):
    """A validated sweep file. Build it with :func:`load_sweep`, which also resolves paths."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    dataset: DatasetConfig
    model: str | None = None
    spec: str | dict[str, Any] | None = None
    shortcut: str | None = None
    input_size: int | None = Field(default=None, ge=1)
    weights: str | None = None  # the unpruned net's start: a state_dict file or torchvision:DEFAULT
    methods: list[MethodEntry] = Field(min_length=1)
    grid: GridConfig
    optuna: OptunaConfig
    teacher: TeacherConfig | None = None
    recipes: RecipesConfig = Field(default_factory=RecipesConfig)
    kd_temperature: float = Field(default=4.0, gt=0)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    scheduler: SchedulerConfig | None = None
    tracking: TrackingConfig
    storage_path: str = "ray_results"
    max_failures: int = Field(default=2, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    seed: int = 0
    device: str | None = None
    finetune_front: bool = True

    @model_serializer(mode="wrap")
    def _without_unset_weights(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Left out when unset, so a sweep without weights records (and resumes) as before.
        dumped = handler(self)
        if dumped.get("weights") is None:
            dumped.pop("weights", None)
        return dumped

    @model_validator(mode="after")
    def _model_or_spec(self) -> SweepConfig:
        if (self.model is None) == (self.spec is None):
            raise ValueError(
                "set exactly one of model (FAMILY:VARIANT, e.g. cifar_resnet:56) and spec "
                "(a spec JSON file or an inline spec)"
            )
        return self

    # -- derived -------------------------------------------------------------------------------
    def full_spec(self) -> Spec:
        """The unpruned spec, with the dataset's usual number of classes (a folder dataset may
        differ; trials resolve it from the data)."""
        if isinstance(self.spec, dict):
            return self.spec
        if self.spec is not None:
            return models.load_spec(self.spec)
        options = {"shortcut": self.shortcut} if self.shortcut else {}
        assert self.model is not None  # the validator requires exactly one of model and spec
        info = DATASETS.get(self.dataset.name)
        size = self.input_size or info.input_size
        return models.full_spec(self.model, num_classes=info.num_classes, input_size=size, **options)

    def cells(self) -> list[Cell]:
        """Every (method, FLOPs target, KD weight) cell, in a fixed order (none in the front mode)."""
        return [
            Cell(m.name, f, w) for m in self.methods for f in self.grid.fixed_targets() for w in self.grid.kd_weights
        ]

    def front_groups(self) -> list[tuple[str, float]]:
        """The front mode's (method, KD weight) pairs, one study each, in a fixed order."""
        return [(m.name, w) for m in self.methods for w in self.grid.kd_weights]

    def budget_use(self) -> dict[str, BudgetUse]:
        """Per method, what its cells' Optuna studies choose (:attr:`.Method.budget_use`; the
        maximum rates only when ``optuna.allocation`` is off)."""
        return {m.name: get_method(m.name).budget_use if self.optuna.allocation else "max_rates" for m in self.methods}

    def num_trials(self) -> int:
        """Trials the sweep runs: per cell its quota; in the front mode ``samples_per_cell`` per study."""
        if self.grid.front_mode:
            return len(self.front_groups()) * self.optuna.samples_per_cell
        use = self.budget_use()
        return sum(cell_quota(use[c.method], self.optuna.samples_per_cell) for c in self.cells())


def cell_quota(use: BudgetUse, samples_per_cell: int) -> int:
    """How many trials a grid cell runs: one when its method's budget is its target alone
    (``use == "target"``: every trial would choose the same subnet), else ``samples_per_cell``."""
    return 1 if use == "target" else samples_per_cell


class Cell(typing.NamedTuple):
    """One grid cell; Optuna keeps one study per cell. (A NamedTuple: a sweep's searcher state
    pickles its cells, and a resumed sweep unpickles them.)"""

    method: str
    flops_target: float
    kd_weight: float

    @property
    def key(self) -> CellKey:
        """The cell's key (its string form names the cell's trials, cache folder and runs)."""
        return CellKey(self.method, self.flops_target, self.kd_weight)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read, validate and resolve a sweep file. Raises :class:`SweepConfigError` (one line).

    ``overrides`` maps dotted field paths to values (``{"tracking.uri": "http://head:5000"}``);
    None values are ignored. They are applied before validation, so they are checked too.
    """
    raw = _read_yaml(Path(path))
    raw.setdefault("name", Path(path).stem)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    return parse_sweep(raw, str(path))


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = raw.get(key)
        if not isinstance(node, dict):
            node = raw[key] = {}
        raw = node
    raw[leaf] = value


def parse_sweep(raw: dict[str, Any], source: str = "<sweep>") -> SweepConfig:
    """Validate an already-parsed sweep mapping (tests, programmatic use); paths are resolved too."""
    try:
        cfg = SweepConfig.model_validate(raw)
        _check_semantics(cfg)
    except ValidationError as e:
        field, message = _describe(e, SweepConfig)
        raise SweepConfigError(f"{source}: {field}: {message}" if field else f"{source}: {message}") from None
    except _FieldError as e:
        raise SweepConfigError(f"{source}: {e.field}: {e.message}") from None
    return resolve_paths(cfg)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SweepConfigError(f"{path}: no such sweep file (see search_spaces/ for examples)") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, an unreadable or a binary file
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a UTF-8 text file"
        raise SweepConfigError(f"{path}: cannot read it as a sweep file ({reason})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise SweepConfigError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raise SweepConfigError(
            f"{path}: the file is empty; a sweep file is a YAML mapping (see search_spaces/ for examples)"
        )
    if not isinstance(raw, dict):
        raise SweepConfigError(f"{path}: a sweep file must be a YAML mapping (key: value), got {type(raw).__name__}")
    return raw


def resolve_paths(cfg: SweepConfig) -> SweepConfig:
    """Make every local path absolute (against the current directory) and inline a spec file."""
    update: dict[str, Any] = {
        "storage_path": _abs_storage(cfg.storage_path),
        "tracking": cfg.tracking.model_copy(update={"uri": _abs_tracking_uri(cfg.tracking.uri)}),
    }
    dataset = {} if cfg.dataset.data_dir is None else {"data_dir": _abs(cfg.dataset.data_dir)}
    if cfg.dataset.cache_dir is not None or "cache_dir" in DATASETS.get(cfg.dataset.name).options:
        # Trials run in their own folders: one cache for all of them, where the sweep was started.
        dataset["cache_dir"] = _abs(cfg.dataset.cache_dir or ".rayprune-cache")
    if dataset:
        update["dataset"] = cfg.dataset.model_copy(update=dataset)
    if isinstance(cfg.spec, str):
        update["spec"] = models.load_spec(_abs(cfg.spec))
    if cfg.model is not None and models.is_source(cfg.model):  # a user file, so that workers find it
        update["model"] = models.absolute_source(cfg.model)
    if cfg.teacher is not None and cfg.teacher.checkpoint is not None:
        update["teacher"] = cfg.teacher.model_copy(update={"checkpoint": _abs(cfg.teacher.checkpoint)})
    if cfg.weights is not None and not cfg.weights.startswith(TORCHVISION):
        update["weights"] = _abs(cfg.weights)
    return cfg.model_copy(update=update)


def _abs(path: str) -> str:
    return str(Path(os.path.expanduser(path)).resolve())


def _abs_storage(path: str) -> str:
    return path if is_uri(path) else _abs(path)


def _abs_tracking_uri(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``; other URIs (http, postgresql) unchanged."""
    path = sqlite_file(uri)
    return uri if path is None else f"{SQLITE_PREFIX}{path}"


# --------------------------------------------------------------------------------------------
# Cross-field checks (pydantic checks each field; these need several, or other modules)
# --------------------------------------------------------------------------------------------


class _FieldError(RaypruneError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _check_semantics(cfg: SweepConfig) -> None:
    _check_methods(cfg)
    _check_recipes(cfg)
    full = _check_model(cfg)
    for i, entry in enumerate(cfg.methods):  # e.g. weight-inheriting methods refuse option_a shortcuts
        try:
            get_method(entry.name).check_spec(full)
        except SpecError as e:
            raise _FieldError(f"methods[{i}].name", str(e)) from None
    _check_budgets(cfg, full)
    if any(w > 0 for w in cfg.grid.kd_weights) and cfg.teacher is None:
        raise _FieldError(
            "teacher",
            "grid.kd_weights has a weight > 0, which needs a teacher: set "
            "teacher.checkpoint (a saved subnet dir) or teacher.recipe (train once per sweep)",
        )
    if cfg.teacher is not None and cfg.teacher.checkpoint is not None:
        _check_teacher_checkpoint(Path(_abs(cfg.teacher.checkpoint)), full, cfg.dataset.name)
    if cfg.weights is not None:
        _check_weights(cfg, full)
    names = [m.name for m in cfg.methods]
    if len(set(names)) != len(names):
        raise _FieldError("methods", f"each method may appear once, got {names}")


def _check_teacher_checkpoint(ckpt: Path, full: Spec, dataset: str) -> None:
    """The teacher folder is a whole saved subnet whose weights load (safely) and fit its spec,
    with the model's number of classes: checked here, before Ray starts, not in a trial."""
    from ..models import subnet_io

    fix = "point it at a dir written by `rayprune run` (final/) or `rayprune teacher`, or use teacher.recipe"
    if not (ckpt / "spec.json").is_file():
        raise _FieldError("teacher.checkpoint", f"{ckpt} is not a saved subnet dir (no spec.json there); {fix}")
    try:
        saved = subnet_io.load(ckpt)
        saved.build()
    except (FileNotFoundError, ValueError, SpecError) as e:  # missing weights, a refused or mismatched file
        raise _FieldError("teacher.checkpoint", str(e)) from None
    if not DATASETS.get(dataset).from_folder and saved.spec.get("num_classes") != full.get("num_classes"):
        raise _FieldError(
            "teacher.checkpoint",
            f"{ckpt} predicts {saved.spec.get('num_classes')} classes, the model {full.get('num_classes')}; {fix}",
        )


def _check_weights(cfg: SweepConfig, full: Spec) -> None:
    """Pretrained weights reach methods that inherit them, and load into the unpruned net: checked
    here, before Ray starts, not in every trial."""
    from ..models.weights import WeightsError, apply_weights

    assert cfg.weights is not None  # called for a sweep with weights only
    scratch = [m.name for m in cfg.methods if not get_method(m.name).inherits_weights]
    if scratch:
        raise _FieldError(
            "weights",
            f"{scratch[0]} trains its subnets from scratch, so pretrained weights would not reach them; "
            "drop weights or use l1, fpgm, random or ast",
        )
    try:
        apply_weights(models.build(full, seed=cfg.seed), full, cfg.weights)
    except WeightsError as e:
        raise _FieldError("weights", str(e)) from None


def _check_methods(cfg: SweepConfig) -> None:
    """Each method's module exists and its hyperparameters validate against its ``Hparams``."""
    for i, entry in enumerate(cfg.methods):
        try:
            cls = get_method(entry.name)
        except UnknownNameError as e:
            raise _FieldError(f"methods[{i}].name", f"{e} (its module is not installed)") from None
        try:
            cls.Hparams.model_validate(entry.hparams)
        except ValidationError as e:
            raise _FieldError(*_describe(e, cls.Hparams, f"methods[{i}].hparams")) from None


def _check_recipes(cfg: SweepConfig) -> None:
    from ..engine.train import TrainConfig

    recipes = {"recipes.search": cfg.recipes.search, "recipes.finetune": cfg.recipes.finetune}
    if cfg.teacher is not None and cfg.teacher.recipe is not None:
        recipes["teacher.recipe"] = cfg.teacher.recipe
    for where, recipe in recipes.items():
        try:
            TrainConfig.model_validate(recipe)
        except ValidationError as e:
            raise _FieldError(*_describe(e, TrainConfig, where)) from None


def _check_model(cfg: SweepConfig) -> Spec:
    field = "model" if cfg.model is not None else "spec"
    try:
        spec = models.validate(cfg.full_spec() if not isinstance(cfg.spec, str) else models.load_spec(_abs(cfg.spec)))
    except SpecError as e:
        raise _FieldError(field, str(e)) from None
    if cfg.input_size is not None:  # the model must run at that size (e.g. even maps for avgpool shortcuts)
        try:
            models.layers(spec, cfg.input_size)
        except SpecError as e:
            raise _FieldError(
                "input_size",
                f"the {field} cannot run at {cfg.input_size}x{cfg.input_size}: "
                f"{str(e).removeprefix(f'input_size {cfg.input_size}: ')}",
            ) from None
    return spec


def _check_budgets(cfg: SweepConfig, full: Spec) -> None:
    """The stage ranges match the model, and the loosest budget can reach every FLOPs target."""
    stages = 1 + max(g.stage for g in models.channel_groups(full))
    ranges = cfg.optuna.stage_prune
    if len(ranges) != stages:
        raise _FieldError(
            "optuna.stage_prune",
            f"the model has {stages} stages, so give {stages} [low, high] ranges (one per stage), got {len(ranges)}",
        )
    loosest = [high for _, high in ranges]
    targets = [(t, f"grid.flops_targets has {t}") for t in cfg.grid.fixed_targets()]
    if cfg.grid.front_mode:  # the lowest target must be reachable; so are all above it
        low = cfg.grid.target_range[0]
        targets = [(low, f"grid.target_range starts at {low:g}; raise it or loosen the ranges")]
    for target, where in targets:
        try:
            Budget(flops_target=target, max_stage_prune=loosest).check_reachable(full, cfg.input_size)
        except SpecError as e:
            raise _FieldError("optuna.stage_prune", f"{e} ({where})") from None


# --------------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------------


def _describe(error: ValidationError, root: type[BaseModel], prefix: str = "") -> tuple[str, str]:
    """The most useful pydantic error as (``prefix.field.path``, message naming the allowed names
    or values, with "did you mean" for a misspelt key): see :func:`rayprune.errors.describe`."""
    return describe(error, root, prefix)
