"""``rayprune sweep`` / ``python launch/sweep.py``: run a sweep file on Ray Tune.

The driver (this module) validates the sweep file before anything starts, resolves paths,
connects to Ray (a local one, or ``--address auto`` to join a cluster), opens the parent MLflow
run, prepares the KD teacher once, and runs Tune: one trial per (method, FLOPs target, KD
weight) cell sample, budgets chosen by the per-cell Optuna searcher. A driver-side Tune callback
(:class:`TrackingCallback`) is the only writer to the tracking store.

Equal treatment: the unpruned baseline is measured once, beside the trials (test, robust: the
teacher, or the unpruned net trained once with ``recipes.finetune``). When every trial is done, each grid
cell's chosen subnet (its trials' ``method.best()``, ranked by their search-val accuracy) is
fine-tuned with ``recipes.finetune`` as parallel Ray tasks with the trial resources, and
measured; the final fronts rank only those. Then one task alone on one node times the baseline and
every candidate, interleaved (:mod:`.isolated_latency`). Every final-phase training goes through the sweep's
one :class:`~.cache.FinalCache`, so no subnet is trained twice with one recipe in one cell, and a
resumed sweep only fine-tunes what is missing. The fronts, plot and ``subnets.parquet`` are
written to the parent run at the end, on resume, and as trials finish (at most every
``PUBLISH_EVERY_S``); at the end the per-cell distinct/reused counts and the front tables are
printed, then the ``mlflow ui`` command.

``--resume`` continues an interrupted sweep (the latest one of this sweep file, or a given id):
finished trials stay finished, running ones continue from their last checkpoint, and the
tracking store is keyed so that nothing is logged twice.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pyarrow.fs
import ray
from ray import tune

from ..engine.data import DATASETS, load_dataset
from ..errors import RaypruneError
from ..grid import TargetWindow
from ..tracking import mlflow_errors
from ..tracking.pareto import DEFAULT_MAX_DROP, compute_fronts, suggested_max_drop
from .baseline import finish_baseline, prepare_teacher, spec_or_none, start_baseline
from .cache import FinalCache
from .cell_finetune import CellChoice, choose_per_cell, finetune_cells, finetune_recipe
from .cluster import browse_hint
from .config import SweepConfig
from .front_mode import FrontSearcher, choose_front_points
from .isolated_latency import measure_finalists
from .search import FINAL_KEY, METRIC, CellSearcher, PerCellASHA, Reachability
from .storage import filesystem, is_uri, join, tune_storage
from .trainable import FINAL_DIR, run_tune_trial
from .trial_spec import TrialSpec, shared_config
from .user_code import user_code_env

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from ..tracking import SweepTracker

LATEST = "latest"  # --resume without an id: the newest restorable sweep of this file


class SweepError(RaypruneError):
    """A sweep cannot start or continue (no Ray cluster, nothing to resume, ...)."""


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did: ``complete`` is False when the sweep was interrupted;
    ``fronts`` are the search, final and robust fronts over the subnet store."""

    sweep_id: str
    experiment_path: str
    parent_run_id: str
    complete: bool
    num_trials: int
    failed_trials: int = 0  # errored for good (after FailureConfig retries); --resume retries them
    fronts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> members (tracking.pareto)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


@mlflow_errors()  # the tracking boundary of the sweep driver
def run_sweep(
    cfg: SweepConfig,
    *,
    address: str | None = None,
    resume: str | None = None,
    num_cpus: int | None = None,
    callbacks: Sequence[tune.Callback] = (),
    out: TextIO | None = None,
    space: str | None = None,
) -> SweepOutcome:
    """Run (or resume) a validated sweep; see the module docstring for the steps.

    Args:
        cfg: from :func:`rayprune.orchestration.config.load_sweep` (paths already absolute).
        address: Ray address to join (``auto``, ``HOST:PORT``); None starts a local Ray unless
            one is already initialised in this process.
        resume: None for a new sweep, ``"latest"`` or a sweep id to continue one.
        num_cpus: CPUs of a local Ray.
        callbacks: extra Tune callbacks (must be picklable: they are saved with the experiment).
        out: where the front table goes (default stdout).
        space: the sweep file's path, recorded for the resume command of an interrupted sweep.
    """
    from .preflight import check_local_resources, check_ray_address, check_storage_path

    out = out or sys.stdout
    _quiet_env()
    check_storage_path(cfg.storage_path)  # before anything is listed or written there
    sweep_id = _sweep_id(cfg, resume)
    _check_tracking_reachable(cfg)  # one clear line within seconds, before Ray starts
    if not ray.is_initialized():  # seconds, not Ray's minutes of retries or a start it cannot use
        check_ray_address(address)
        if address is None:
            check_local_resources(cfg.resources.cpu, cfg.resources.gpu, num_cpus)
    if address is None:
        _check_local_data(cfg)
    started_ray = _init_ray(address, num_cpus, cfg.model)
    try:
        if address is None:
            _check_local_resources(cfg)
        if 0 < cfg.resources.gpu < 1:
            print(
                f"rayprune: resources.gpu {cfg.resources.gpu:g}: up to {int(1 // cfg.resources.gpu)} trials share "
                "each GPU, so the latency they measure is skewed (their records say so: source.latency_shared_gpu)",
                flush=True,
            )
        tracker = _make_tracker(cfg, sweep_id)
        live = _LIVE_TRACKER.set(tracker)
        pending = _pending_trials(cfg)
        try:
            return _drive(cfg, sweep_id, tracker, resume is not None, callbacks, out, space)
        finally:
            _LIVE_TRACKER.reset(live)
            if pending is not None:
                os.environ.pop(PENDING_TRIALS_ENV, None)
    finally:
        if started_ray:
            ray.shutdown()


def _drive(
    cfg: SweepConfig,
    sweep_id: str,
    tracker: SweepTracker,
    resume: bool,
    callbacks: Sequence[tune.Callback],
    out: TextIO,
    space: str | None = None,
) -> SweepOutcome:
    """Parent run, teacher, baseline, Tune, cell fine-tunes, output; the parent run is FAILED on an
    error, KILLED on Ctrl-C after Tune (e.g. during the fine-tunes: an incomplete outcome)."""
    from ..tracking.liveness import SPACE_TAG

    experiment_path = join(cfg.storage_path, sweep_id)
    tags = {
        "rayprune.sweep_id": sweep_id,
        "rayprune.sweep_file": cfg.name,
        **({SPACE_TAG: str(space)} if space else {}),
    }
    parent = tracker.start_sweep(sweep_id, _resolved(cfg), tags)
    results = None
    try:
        if resume:
            _replay_reported_steps(tracker, experiment_path)
        teacher = prepare_teacher(cfg, experiment_path)
        baseline = start_baseline(cfg, experiment_path, teacher)  # beside the trials: they do not need it
        if resume:
            tracker.update_front()  # the fronts, plot and parquet as they stand
        results = _make_tuner(cfg, sweep_id, experiment_path, teacher, resume, callbacks).fit()
        publish_study_progress(tracker, study_history_path(cfg, sweep_id))
        # max: a searcher restored from an older sweep may hand out more trials than the file now says
        complete = results.num_terminated + results.num_errors == max(len(results), cfg.num_trials())
        failed = results.num_errors
        if complete:  # an interrupted sweep leaves it to the resume (the cache keeps it if it finished)
            tracker.log_unpruned(finish_baseline(experiment_path, teacher, *baseline))
        if complete and cfg.finetune_front:
            choices = choose_front_points(results, cfg.grid.front_points) if cfg.grid.front_mode else None
            finetune_cells(cfg, tracker, results, experiment_path, _driver_dir(cfg, sweep_id), choices)
            # alone on a node, once nothing else runs: latency comparable across the candidates
            measure_finalists(cfg, tracker, experiment_path, baseline[0])
        if complete:  # per-cell counts of a part of the sweep would read as its result
            print_cell_stats(tracker, out)
    except KeyboardInterrupt:
        tracker.fail("KILLED")
        if results is None:  # before Tune saved anything to resume
            raise
        # after Tune (the fine-tunes): the members finished so far are in the cache and in MLflow
        return SweepOutcome(sweep_id, experiment_path, parent, False, len(results), results.num_errors)
    except BaseException:
        tracker.fail()  # --resume reopens it
        raise
    tracker.finish("FINISHED" if complete else "KILLED")  # also writes the fronts, plot and parquet
    if complete:  # an interrupted sweep's partial fronts must not read as its result
        print_front(tracker, cfg, out)
    return SweepOutcome(
        sweep_id, experiment_path, parent, complete, len(results), failed, compute_fronts(tracker.store.rows())
    )


def _quiet_env() -> None:
    """Defaults the user can still override: no usage stats (offline); no CSV/TensorBoard result
    loggers (MLflow and the Parquet store are the record; JSON results stay)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # CheckpointConfig(num_to_keep) forces an experiment snapshot per trial checkpoint, which
    # Tune then warns about on every short step; it is what keeps the resume state consistent.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The classic reporter: one compact live table with our columns (the new output prints
    # every trial's full config and result as boxes).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    _quiet_missing_results()


class _NoResultsYet(logging.Filter):
    """Drops Tune's "Failed to fetch metrics for N trial(s) ... result.json and progress.csv were
    not found" when every trial it lists simply had not reported yet (a resumed sweep's trials
    that were interrupted before their first step): nothing is missing, they start over."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Failed to fetch metrics"):
            return True
        failures = text.splitlines()[1:]
        return not failures or not all("were not found" in line for line in failures)


def _quiet_missing_results() -> None:
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    if not any(isinstance(f, _NoResultsYet) for f in log.filters):
        log.addFilter(_NoResultsYet())


def _init_ray(address: str | None, num_cpus: int | None, model: str | None = None) -> bool:
    """Connect to Ray, shipping ``model``'s user code to the workers (:mod:`.user_code`); True
    when this call started it (so the driver shuts it down)."""
    if ray.is_initialized():
        return False
    try:
        with user_code_env(model) as runtime_env:
            if address is None:  # "local": a fresh instance, even if `ray start` ran on this machine before
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    log_to_driver=True,
                    runtime_env=runtime_env or None,
                )
            else:
                ray.init(address=address, log_to_driver=True, runtime_env=runtime_env or None)
    except ConnectionError as e:
        raise SweepError(
            f"cannot join the Ray cluster at {address!r} ({e})",
            fix="start one with `ray start --head` or `ray up launch/cluster.yaml`, or run on a local Ray",
            hint="local_ray",
        ) from None
    resources = ray.cluster_resources()
    print(
        f"Ray cluster at {ray.get_runtime_context().gcs_address} ({'joined' if address else 'local'}): "
        f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs",
        flush=True,
    )
    return True


PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


def _pending_trials(cfg: SweepConfig) -> str | None:
    """Let Tune start as many trials at once as the cluster has room for. With a searcher (ours)
    and no ``max_concurrent_trials``, Tune keeps one trial pending at a time: every trial waits
    until the one before it has its actor, so short trials never fill the cluster. Sets
    ``TUNE_MAX_PENDING_TRIALS_PG`` (unless the user did) to the trials the cluster fits now;
    returns the value set, or None."""
    if PENDING_TRIALS_ENV in os.environ or cfg.max_concurrent_trials is not None:
        return None
    have = ray.cluster_resources()
    slots = have.get("CPU", 0.0) / cfg.resources.cpu
    if cfg.resources.gpu:
        slots = min(slots, have.get("GPU", 0.0) / cfg.resources.gpu)
    value = str(max(1, int(slots + 1e-9)))
    os.environ[PENDING_TRIALS_ENV] = value
    return value


def _check_local_data(cfg: SweepConfig) -> None:
    """A local sweep's tasks read a downloadable dataset (CIFAR) from this machine: load it once
    here, so missing data is one :class:`DataError` line before Ray starts, and a download happens
    once, not per trial. (On a cluster each node has its own data; ImageNet folders are only
    scanned by the tasks.)"""
    info = DATASETS.get(cfg.dataset.name)
    if info.downloads:
        load_dataset(cfg.dataset.name, cfg.dataset.data_dir)
    elif info.check is not None:  # the user's folders: checked here, so bad data is one line before Ray starts
        info.check(cfg.dataset.data_dir)


def _check_local_resources(cfg: SweepConfig) -> None:
    """The preflight's check against the local Ray as started (or as the caller started it)."""
    from .preflight import check_trial_fits

    check_trial_fits(cfg.resources.cpu, cfg.resources.gpu, ray.cluster_resources(), "this machine's Ray", SweepError)


def _sweep_id(cfg: SweepConfig, resume: str | None) -> str:
    if resume is None:
        return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidates = _restorable(cfg)
    if resume == LATEST:
        if not candidates:
            raise SweepError(
                f"no sweep named {cfg.name}-* to resume under {cfg.storage_path}",
                fix="start a new one",
                hint="no_resume",
            )
        resume = candidates[-1]
    elif resume not in candidates:
        known = ", ".join(candidates) or "none"
        raise SweepError(f"no resumable sweep {resume!r} under {cfg.storage_path}; resumable: {known}")
    _check_experiment_state(join(cfg.storage_path, resume))
    return resume


def _check_experiment_state(experiment_path: str) -> None:
    """Refuse a sweep whose newest Tune experiment state does not parse. Tune would log the
    error and start the sweep again from nothing under the old id. (rayprune writes local state
    whole or not at all; this is a file cut short by something else, or edited.)"""
    fs, root = filesystem(experiment_path)
    names = [Path(i.path).name for i in fs.get_file_info(pyarrow.fs.FileSelector(root))]
    states = fnmatch.filter(names, "experiment_state-*.json")
    if not states:  # killed before its first save: Tune starts the trials, none had finished
        return
    newest = max(states)  # the name holds the driver's start time, as Tune picks it
    with fs.open_input_stream(f"{root}/{newest}") as f:
        text = f.read()
    try:
        json.loads(text)
    except ValueError:
        raise SweepError(
            f"sweep {Path(experiment_path).name} cannot be resumed: its Tune state {newest} "
            f"({len(text)} bytes) is not valid JSON",
            fix="start a new sweep (its finished subnets stay in MLflow and the subnet store)",
        ) from None


def _restorable(cfg: SweepConfig) -> list[str]:
    """Sweep ids of this file under the storage path that Tune can restore, oldest first."""
    fs, root = filesystem(cfg.storage_path)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    names = sorted(Path(i.path).name for i in infos if i.type == pyarrow.fs.FileType.Directory)
    return [n for n in names if n.startswith(f"{cfg.name}-") and tune.Tuner.can_restore(join(cfg.storage_path, n))]


def _resolved(cfg: SweepConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Tracking (the driver-side callback is the only writer)
# --------------------------------------------------------------------------------------------

# The SweepTracker of the sweep this driver runs, bound by run_sweep for the sweep's duration
# (one value, reset when it ends). Tune pickles the callback with the experiment (its RunConfig)
# and a resume runs that unpickled copy, so the callback holds only the sweep id and finds the
# live tracker here.
_LIVE_TRACKER: ContextVar[Any] = ContextVar("rayprune_sweep_tracker")


def _check_tracking_reachable(cfg: SweepConfig) -> None:
    from ..tracking import TrackingError
    from ..tracking.lookup import check_reachable

    try:
        check_reachable(cfg.tracking.uri)
    except TrackingError as e:
        raise SweepError(str(e)) from None


def _make_tracker(cfg: SweepConfig, sweep_id: str) -> SweepTracker:
    from ..tracking import TrackingError
    from ..tracking.mlflow_tracker import SweepTracker

    try:
        return SweepTracker(cfg.tracking.uri, cfg.tracking.experiment, _driver_dir(cfg, sweep_id), say=_say)
    except TrackingError as e:
        raise SweepError(str(e)) from None


def _say(line: str) -> None:
    """Where the tracker's notes go: stdout, with the driver's other progress lines."""
    print(line, flush=True)


def _driver_dir(cfg: SweepConfig, sweep_id: str) -> Path:
    """Local dir of the driver's own files (Parquet store, plots, fine-tuned front members)."""
    if is_uri(cfg.storage_path):
        root = Path(os.environ.get("RAYPRUNE_SWEEP_DIR", Path.home() / ".cache" / "rayprune" / "sweeps"))
        return root / sweep_id
    return Path(cfg.storage_path) / sweep_id / "rayprune"


STUDY_HISTORY = "studies.json"


def study_history_path(cfg: SweepConfig, sweep_id: str) -> Path:
    """Where the driver's searcher writes its told trials (:attr:`.StudyRounds.history`)."""
    return _driver_dir(cfg, sweep_id) / STUDY_HISTORY


def publish_study_progress(tracker: SweepTracker, path: Path) -> None:
    """The studies' best objective against the trial count, on the parent run (the searcher,
    in this driver, wrote what it told; nothing when no round was told)."""
    if path.is_file():
        tracker.log_study_progress(json.loads(path.read_text()))


class TrackingCallback(tune.Callback):
    """Logs every trial's start, step records, final record and status through the sweep's
    ``SweepTracker`` (MLflow child runs + the Parquet subnet store). Runs in the driver only."""

    def __init__(self, sweep_id: str) -> None:
        self.sweep_id = sweep_id

    @property
    def tracker(self) -> SweepTracker:
        tracker = _LIVE_TRACKER.get(None)
        if tracker is None or tracker.sweep_id != self.sweep_id:
            raise RuntimeError(
                f"TrackingCallback: sweep {self.sweep_id!r} has no live tracker in this driver "
                "(run it through run_sweep)"
            )
        return tracker

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        spec = TrialSpec.from_config(trial.config)
        self.tracker.trial_started(trial.trial_id, _trial_params(spec), run_name=_trial_label(spec, trial.trial_id))

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        if result.get(FINAL_KEY):
            return  # logged with its artifacts when the trial completes
        spec = TrialSpec.from_config(trial.config)
        subnets = json.loads(result.get("subnets") or "[]")
        cell = _cell(spec.flops_target, spec.kd_weight)
        self.tracker.log_step(trial.trial_id, int(result["step"]), _scalars(result), subnets, cell=cell)

    # The fronts, plot and parquet are written at the end of the sweep, on resume, and as trials
    # finish at most every PUBLISH_EVERY_S (tracker.publish_if_due): refreshing them on every
    # trial completion would cost O(trials^2) uploads.
    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        last = trial.last_result or {}
        if not last.get(FINAL_KEY):  # stopped early by the scheduler
            self.tracker.trial_finished(trial.trial_id, None, None, "KILLED", refresh_front=False)
            return
        spec = TrialSpec.from_config(trial.config)
        final = json.loads(last["final_record"])
        self.tracker.log_trial_params(trial.trial_id, _rate_params(final))
        with _final_dir(trial.checkpoint) as final_dir:
            cell = _cell(spec.flops_target, spec.kd_weight)
            self.tracker.trial_finished(trial.trial_id, final, final_dir, "FINISHED", refresh_front=False, cell=cell)
        window = final["source"].get("window") or {}
        if window.get("status", "in_window") != "in_window":
            print(
                f"rayprune: trial {_trial_label(spec, trial.trial_id)}: its subnet has "
                f"{window['fraction_of_target']:.3f} of the target MACs, {window['status'].replace('_', ' ')} "
                f"{TargetWindow.describe()} (recorded in its final record and in the per-cell counts)",
                flush=True,
            )
        self.tracker.note_cell(spec.method, spec.flops_target, spec.kd_weight)
        self.tracker.publish_if_due()

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self.tracker.trial_finished(trial.trial_id, None, None, "FAILED", refresh_front=False)


def _cell(flops_target: float, kd_weight: float) -> dict[str, float]:
    """A trial's cell as the tracker takes it with its records."""
    return {"flops_target": float(flops_target), "kd_weight": float(kd_weight)}


def _replay_reported_steps(tracker: SweepTracker, experiment_path: str) -> None:
    """On resume, log again every step result Tune saved (each trial's ``result.json``).

    The store ignores rows it already has. A driver on another machine starts from the copy of
    ``subnets.parquet`` last uploaded to the parent run; the steps reported after that upload
    would be lost otherwise, because resumed trials continue after their last checkpoint and
    never report those steps again.
    """
    fs, root = filesystem(experiment_path)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        result_file = f"{info.path}/result.json"
        if info.type != pyarrow.fs.FileType.Directory or fs.get_file_info(result_file).type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_stream(result_file) as f:
            lines = f.readall().decode().splitlines()
        for result in map(json.loads, filter(None, lines)):
            if not result.get(FINAL_KEY):
                tracker.log_step(
                    result["trial_id"],
                    int(result["step"]),
                    _scalars(result),
                    json.loads(result.get("subnets") or "[]"),
                    cell=_cell(result["flops_target"], result["kd_weight"]),
                )


def _trial_params(spec: TrialSpec) -> dict[str, Any]:
    """Flat MLflow params of a trial: the cell, the budget (the maximum rates, and the proposed
    allocation's shares as ``alloc_stage{i}`` when it has one) and the method's hyperparameters."""
    params: dict[str, Any] = {
        "method": spec.method,
        "flops_target": spec.flops_target,
        "kd_weight": spec.kd_weight,
        "cell": spec.cell_index,
        "optuna_number": spec.optuna_number,
    }
    params.update({f"max_prune_stage{i}": r for i, r in enumerate(spec.max_stage_prune)})
    params.update({f"alloc_stage{i}": a for i, a in enumerate(spec.allocation or ())})
    params.update({f"hp.{k}": v for k, v in spec.method_hparams.items()})
    params["seed"] = spec.seed
    return params


def _rate_params(final: dict[str, Any]) -> dict[str, float]:
    """The realised per-stage rates of a trial's final subnet (``source["stage_rates"]``) as the
    MLflow params ``rate_stage{i}``."""
    return {f"rate_stage{i}": r for i, r in enumerate(final["source"].get("stage_rates") or ())}


def _scalars(result: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a step report (method metrics included, JSON fields left out)."""
    keys = (METRIC, "macs", "params", "flops_fraction", "steps_done")
    metrics = {k: float(result[k]) for k in keys if isinstance(result.get(k), (int, float))}
    metrics.update({f"method/{k}": float(v) for k, v in (result.get("method_metrics") or {}).items()})
    return metrics


@contextmanager
def _final_dir(checkpoint: tune.Checkpoint | None) -> Iterator[Path | None]:
    """The ``final/`` subnet dir inside a trial's last checkpoint, as a local path."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        final = Path(d) / FINAL_DIR
        yield final if final.is_dir() else None


# --------------------------------------------------------------------------------------------
# Teacher and Tune set-up
# --------------------------------------------------------------------------------------------


def param_space(cfg: SweepConfig, teacher: str | None, final_cache: str | None = None) -> dict[str, Any]:
    """The fixed part of every trial's config (the searcher adds the cell and budget);
    ``final_cache`` is the root of the sweep's :class:`~.cache.FinalCache`."""
    base = {
        "model": cfg.model,
        "spec": spec_or_none(cfg),
        "shortcut": cfg.shortcut,
        "dataset": cfg.dataset.name,
        "data_dir": cfg.dataset.data_dir,
        **({"dataset_options": cfg.dataset.options()} if cfg.dataset.options() else {}),
        "kd_temperature": cfg.kd_temperature,
        "seed": cfg.seed,
        "device": cfg.device,
        "finetune": dict(cfg.recipes.search),
        "teacher": teacher,
        "input_size": cfg.input_size,
        "max_steps": cfg.max_steps,
        **({"weights": cfg.weights} if cfg.weights is not None else {}),
    }
    return shared_config(base, {m.name: dict(m.hparams) for m in cfg.methods}, cfg.resources.cpu, final_cache)


def make_searcher(cfg: SweepConfig, history_path: str | None = None) -> CellSearcher:
    """The sweep's searcher (the front mode's in the front mode); ``history_path``: where it
    writes its told trials after each round."""
    if cfg.grid.front_mode:
        return FrontSearcher(
            cfg.front_groups(),
            cfg.optuna.samples_per_cell,
            cfg.optuna.stage_prune,
            cfg.grid.target_range,
            sampler=cfg.optuna.sampler,
            seed=cfg.optuna.seed,
            n_startup_trials=cfg.optuna.n_startup_trials,
            feasibility=Reachability(cfg.full_spec(), cfg.input_size),
            budget_use=cfg.budget_use(),
            trials_per_round=cfg.optuna.trials_per_round,
            history_path=history_path,
        )
    return CellSearcher(
        cfg.cells(),
        cfg.optuna.samples_per_cell,
        cfg.optuna.stage_prune,
        sampler=cfg.optuna.sampler,
        seed=cfg.optuna.seed,
        n_startup_trials=cfg.optuna.n_startup_trials,
        feasibility=Reachability(cfg.full_spec(), cfg.input_size),
        budget_use=cfg.budget_use(),
        trials_per_round=cfg.optuna.trials_per_round,
        history_path=history_path,
    )


def _trial_name(trial: Trial) -> str:
    """``<cell>_<trial id>`` (``ast_f0.5_kd0.9_<id>``): Tune's trial and dir name and the MLflow
    child run's name, so a trial reads the same in the console, on disk and in the UI."""
    return _trial_label(TrialSpec.from_config(trial.config), trial.trial_id)


def _trial_label(spec: TrialSpec, trial_id: str) -> str:
    """What :func:`_trial_name` names a trial, from its parsed spec."""
    return f"{spec.cell}_{trial_id}"


def _make_tuner(
    cfg: SweepConfig,
    sweep_id: str,
    experiment_path: str,
    teacher: str | None,
    resume: bool,
    callbacks: Sequence[tune.Callback],
) -> tune.Tuner:
    trainable = tune.with_resources(run_tune_trial, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    storage_path, storage_filesystem = tune_storage(cfg.storage_path)
    if resume:
        # Finished trials stay finished; unfinished and errored ones continue from their checkpoints.
        return tune.Tuner.restore(
            experiment_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_filesystem,
        )
    scheduler = None
    if cfg.scheduler is not None:
        scheduler = PerCellASHA(
            grace_period=cfg.scheduler.grace_period,
            reduction_factor=cfg.scheduler.reduction_factor,
            max_t=cfg.scheduler.max_t,
        )
    from ray.tune.logger import JsonLoggerCallback

    return tune.Tuner(
        trainable,
        param_space=param_space(cfg, teacher, FinalCache.of_experiment(experiment_path).root),
        # No metric/mode here: a "best trial" across cells of different FLOPs targets means nothing.
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(cfg, str(study_history_path(cfg, sweep_id))),
            scheduler=scheduler,
            num_samples=cfg.num_trials(),
            max_concurrent_trials=cfg.max_concurrent_trials,
            # CPU trials reuse their worker (imports, data): seconds per short trial.
            # GPU trials do not, so no trial inherits another's CUDA memory cache.
            reuse_actors=cfg.resources.gpu == 0,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep_id,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[TrackingCallback(sweep_id), JsonLoggerCallback(), *callbacks],
            progress_reporter=progress_table(),
            verbose=1,
        ),
    )


def progress_table() -> tune.CLIReporter:
    """The live trial table: cell, budget progress and the key metrics."""
    return tune.CLIReporter(
        parameter_columns={"method": "method", "flops_target": "flops", "kd_weight": "kd"},
        metric_columns={
            "training_iteration": "iter",
            METRIC: "val_top1",
            "flops_fraction": "macs/full",
            "test_top1": "test_top1",
            "robust_top1": "robust_top1",
        },
        max_report_frequency=10,
        sort_by_metric=False,
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def print_cell_stats(tracker: SweepTracker, out: TextIO) -> None:
    """Per grid cell: trials, distinct subnets among their chosen ones, trials that reused one."""
    stats = tracker.cell_stats()
    if not stats:
        return
    print(
        "\nTrials per grid cell (distinct: different chosen subnets; reused: trials whose chosen subnet was "
        "already trained with the recipe, so it was not trained again; outside: subnets not within "
        f"{TargetWindow.describe('the target MACs')}):",
        file=out,
    )
    width = max(len(s["cell"]) for s in stats)
    for s in stats:
        print(
            f"  {s['cell']:<{width}}  trials {s['trials']}  distinct {s['distinct']}  reused {s['reused']}  "
            f"outside {s['outside_window']}",
            file=out,
        )
    total = {k: sum(s[k] for s in stats) for k in ("trials", "distinct", "reused", "outside_window")}
    print(
        f"  {'all cells':<{width}}  trials {total['trials']}  distinct {total['distinct']}  "
        f"reused {total['reused']}  outside {total['outside_window']}",
        file=out,
        flush=True,
    )


def print_front(tracker: SweepTracker, cfg: SweepConfig, out: TextIO) -> None:
    """The fronts as tables (what ``rayprune front`` shows), then how to browse the runs."""
    print("\n" + tracker.front_table(), file=out)
    print("\n" + browse_hint(cfg.tracking.uri, tracker.experiment_id), file=out)
    pick = f"rayprune pick --experiment {cfg.tracking.experiment} --mlflow-uri {cfg.tracking.uri}"
    drop = suggested_max_drop(tracker.store.rows())
    option = "" if drop in (None, DEFAULT_MAX_DROP) else f" --max-drop {drop:g}"
    print(
        f"Export an operating point: {pick} --mode efficient{option} --out export/efficient\n"
        f"                       or: {pick} --mode robust{option} --out export/robust",
        file=out,
        flush=True,
    )


__all__ = [
    "CellChoice",
    "SweepError",
    "SweepOutcome",
    "TrackingCallback",
    "choose_per_cell",
    "finetune_recipe",
    "make_searcher",
    "param_space",
    "print_cell_stats",
    "print_front",
    "run_sweep",
]
