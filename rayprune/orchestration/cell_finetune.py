"""The end of a sweep: every grid cell's chosen subnet fine-tuned with one recipe.

Equal treatment for the final fronts: per cell, :func:`choose_per_cell` takes the finished
trial whose chosen subnet has the best search-val accuracy, and :func:`finetune_cells`
fine-tunes it with ``recipes.finetune`` (the cell's KD weight) as a Ray task with the trial
resources. Every training goes through the sweep's :class:`~.cache.FinalCache`: each member is
stored and logged as soon as it finishes, so an interrupted sweep keeps the finished members
and a resume only fine-tunes the missing ones.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import ray

from .. import models
from ..engine.data import DATASETS
from ..engine.train import TrainConfig
from ..methods.finetune import recipe_hash, recipe_of
from ..runner import STATE_FILE, TrialConfig, TrialState, build_method, restore, save_subnet
from .cache import FinalCache, cache_key
from .config import SweepConfig
from .final_phase import final_phase
from .storage import localize
from .trial_spec import FINAL_KEY, METRIC, TrialSpec

if TYPE_CHECKING:
    from ray.tune import ResultGrid

    from ..tracking import SweepTracker


@dataclass
class CellChoice:
    """A grid cell's chosen subnet: the best trial final by search-val accuracy."""

    spec: TrialSpec  # the chosen trial's, parsed from its config
    result: Any  # the trial's tune.Result
    record: dict[str, Any]  # its final SubnetRecord dict
    origin: str | None = None  # "front": chosen by the front mode (recorded as source["search_mode"])

    @property
    def cell(self) -> str:
        """The cell's name (its key's string form): its cache folder, fine-tune folder and runs."""
        return str(self.spec.cell)


def choose_per_cell(results: ResultGrid) -> list[CellChoice]:
    """Per grid cell, the finished trial whose chosen subnet has the highest search-val
    accuracy (val_top1 as the method measured it: comparable inside a cell, one method);
    ties go to the earlier Optuna trial. Cells in grid order."""
    best: dict[int, tuple[tuple, CellChoice]] = {}
    for choice in final_choices(results):
        val = choice.record["metrics"].get(METRIC)
        val = float("-inf") if val is None or val != val else float(val)
        spec = choice.spec
        rank = (-val, spec.optuna_number, str(choice.result.metrics.get("trial_id")))
        cell = spec.cell_index
        if cell not in best or rank < best[cell][0]:
            best[cell] = (rank, choice)
    return [best[c][1] for c in sorted(best)]


def final_choices(results: ResultGrid) -> list[CellChoice]:
    """Every trial that reported its final record, as a (candidate) choice, in result order."""
    choices = []
    for r in results:  # type: ignore[attr-defined]  # ResultGrid iterates through __getitem__
        metrics = r.metrics or {}
        if metrics.get(FINAL_KEY) and metrics.get("final_record"):
            choices.append(CellChoice(TrialSpec.from_config(r.config), r, json.loads(metrics["final_record"])))
    return choices


def finetune_recipe(cfg: SweepConfig, kd_weight: float) -> dict[str, Any]:
    """``recipes.finetune`` with a cell's KD weight: the recipe of the end-of-sweep fine-tunes."""
    return recipe_of(
        TrainConfig(**cfg.recipes.finetune).model_copy(
            update={"kd_weight": kd_weight, "kd_temperature": cfg.kd_temperature}
        )
    )


def finetune_cells(
    cfg: SweepConfig,
    tracker: SweepTracker,
    results: ResultGrid,
    experiment_path: str,
    driver_dir: Path,
    choices: list[CellChoice] | None = None,
) -> None:
    """Fine-tune every cell's chosen subnet with ``recipes.finetune`` (parallel Ray tasks with
    the trial resources), through the final-phase cache: trainings already there (done before an
    interruption, or equal to a trial's own final when the recipes are equal) are reused.
    ``choices``: what to fine-tune instead of :func:`choose_per_cell` (the front mode's points)."""
    cache = FinalCache.of_experiment(experiment_path)
    todo: list[tuple[CellChoice, str]] = []
    done: list[tuple[CellChoice, str]] = []
    for choice in choose_per_cell(results) if choices is None else choices:
        kd = choice.spec.kd_weight
        key = cache_key(choice.cell, models.spec_hash(choice.record["spec"]), recipe_hash(finetune_recipe(cfg, kd)), kd)
        (done if key in cache else todo).append((choice, key))
    if todo:
        what = "front-mode point(s)" if choices is not None else "grid cell(s)"
        print(
            f"Fine-tuning the chosen subnet of {len(todo)} {what} with recipes.finetune "
            f"({len(done)} already in the cache) ...",
            flush=True,
        )
    for choice, key in done:
        _log_cell_finetune(tracker, cache, driver_dir, choice, key, cached=True)
    task = ray.remote(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)(_finetune_member_task)
    pending = {
        task.remote(_member_config(cfg, c.spec), c.record, checkpoint_location(c.result), cache.root, c.cell): (c, k)
        for c, k in todo
    }
    try:
        while pending:  # log each as it finishes: an interruption keeps (cache) and shows (MLflow) the done ones
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            ray.get(ref)
            _log_cell_finetune(tracker, cache, driver_dir, *pending.pop(ref), cached=False)
    except BaseException:  # Ctrl-C or an error: stop the others (a dead driver's tasks die with it anyway)
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _log_cell_finetune(
    tracker: SweepTracker, cache: FinalCache, driver_dir: Path, choice: CellChoice, key: str, cached: bool
) -> None:
    entry = cache.get(key)
    assert entry is not None  # finetune_cells logs a key once the cache has it
    record, state = entry
    if cached and "reused_from" not in record["source"]:
        record = {**record, "source": {**record["source"], "reused_from": record["source"].get("trained_by")}}
    if choice.origin is not None:
        record = {**record, "source": {**record["source"], "search_mode": choice.origin}}
    target = save_subnet(
        driver_dir / "finetuned" / choice.cell,
        record["spec"],
        state,
        record,
        input_size=trained_input_size(choice.spec),
    )
    tracker.log_finetuned(
        record,
        target,
        trial_id=str(choice.result.metrics.get("trial_id")),
        cell=choice.cell,
        flops_target=choice.spec.flops_target,
        kd_weight=choice.spec.kd_weight,
    )


def trained_input_size(spec: TrialSpec) -> int:
    """The input size a trial's subnets are trained and measured at: the sweep's ``input_size``,
    else the dataset's (what :func:`~rayprune.runner.build_method` gives the method's context)."""
    return int(spec.base.get("input_size") or DATASETS.get(str(spec.base["dataset"])).input_size)


def _member_config(cfg: SweepConfig, spec: TrialSpec) -> dict[str, Any]:
    # No latency here: the other fine-tunes share the cores; measure_finalists times them all alone.
    update = {"finetune": dict(cfg.recipes.finetune), "measure_latency": False}
    return spec.trial_config().model_copy(update=update).model_dump()


def checkpoint_location(result: Any) -> tuple[pyarrow.fs.FileSystem, str] | None:
    """Where a trial's (a ``tune.Result``'s) last checkpoint is: its filesystem and folder. A task
    gets this, not the ``Checkpoint`` object, whose unpickling would import Ray Tune and Train."""
    checkpoint = result.checkpoint
    return None if checkpoint is None else (checkpoint.filesystem, checkpoint.path)


def _finetune_member_task(
    trial_cfg: dict[str, Any],
    record: dict[str, Any],
    checkpoint: tuple[pyarrow.fs.FileSystem, str] | None,
    cache_root: str,
    cell: str,
) -> None:
    """Ray task body: rebuild the cell's chosen trial's method from its last checkpoint, so the
    fine-tune starts from the weights the method gives that subnet (``initial_weights``), then
    fine-tune and measure it (test, robust accuracy; latency comes later, in isolation) into the cache."""
    from ..methods import SubnetRecord

    tc = TrialConfig(**trial_cfg)
    member = SubnetRecord.from_dict(record)
    member = SubnetRecord(
        spec=member.spec,
        macs=member.macs,
        params=member.params,
        metrics={k: v for k, v in member.metrics.items() if k == METRIC},
        method=member.method,
        step=member.step,
        source={
            k: v
            for k, v in member.source.items()
            if k
            not in (
                "recipe",
                "recipe_tag",
                "recipe_hash",
                "init",
                "trained_by",
                "reused_from",
                "cache_key",
                "finetuned",
                "robust_suite",
            )
        },
    )
    with tempfile.TemporaryDirectory() as work:
        if tc.teacher is not None:
            tc = tc.model_copy(update={"teacher": localize(tc.teacher, Path(work) / "teacher")})
        method = build_method(tc, Path(work) / "method")
        if checkpoint is not None:
            fs, folder = checkpoint
            state_file = Path(work) / STATE_FILE
            pyarrow.fs.copy_files(f"{folder}/{STATE_FILE}", str(state_file), source_filesystem=fs)
            restore(method, TrialState.load(state_file))
        final_phase(method, FinalCache(cache_root), cell, f"finetune:{cell}", record=member)
