"""The sweep driver's recorder: every subnet a sweep evaluates, in MLflow and in ``subnets.parquet``.

:class:`SweepTracker` composes four parts, each in its own module:

* :class:`~.mlflow_writer.RunWriter` -- the MLflow runs: the parent run, a child run per trial and
  per fine-tuned grid cell, and every param, metric, tag and artifact written to them;
* :class:`~.store.SubnetStore` -- the Parquet subnet registry, one row per evaluated subnet
  (journaled, folded into ``subnets.parquet`` at most every :data:`COMPACT_EVERY_S`);
* :class:`~.liveness.DriverLiveness` -- the driver's heartbeat and status on its parent run;
* :class:`~.publisher.FrontsPublisher` -- the fronts, plot, registry and per-cell counts on the
  parent run, and the note when a cell's budgets do not bind.

It remains one object because the driver, its Tune callback (which finds it by sweep id) and the
cell fine-tunes record into one sweep: each record goes to the store (keyed, so never twice) and
to its run, with the grid cell its trial belongs to. Its methods only route a record to those
parts, and its fronts methods (:meth:`~SweepTracker.update_front`, ``publish_if_due``,
``note_cell``, ``cell_stats``, ``front_table``) hand over to the publisher. It never prints: the
driver passes ``say`` for its notes. Subnets are *not* runs: a sweep evaluates thousands and the
UI pages runs by about a hundred; a trial run holds its subnet records as one table. Where each
record goes:

* the unpruned baseline (:meth:`SweepTracker.log_unpruned`): a store row and ``unpruned_*``
  metrics on the parent run;
* a step (:meth:`SweepTracker.log_step`): its subnets as ``search`` rows, its metrics on the
  trial run;
* a trial's end (:meth:`SweepTracker.trial_finished`): its ``final`` row, its saved subnet, its
  final metrics and status on the trial run;
* a cell's fine-tune (:meth:`SweepTracker.log_finetuned`): a ``finetuned`` row and a run
  ``finetune-<cell>`` with ``macs``, ``macs_pct``, ``test_top1``, ``test_top1_drop``,
  ``robust_top1`` and ``latency_ms`` as metrics: the equally-treated candidates, so MLflow's own table and chart
  views show the final front.

A resumed driver reopens the parent and the child runs, and a store that is empty here (a driver
on another machine) starts from the copy last published to the parent run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..grid import CellKey
from .liveness import DriverLiveness, driver_tags
from .lookup import SUBNETS_ARTIFACT, SWEEP_TAG
from .mlflow_writer import RunWriter, flatten_params, numeric_metrics, run_status
from .pareto import baseline_row
from .publisher import PUBLISH_EVERY_S, Fronts, FrontsPublisher
from .store import SubnetStore, record_row, table_row
from .study_plot import PLOT_ARTIFACT, TABLE_ARTIFACT, plot_best_objective

COMPACT_EVERY_S = 30.0  # how often at most the driver rewrites subnets.parquet from its journal


def cell_of(params: dict[str, Any]) -> dict[str, float] | None:
    """The grid cell (``flops_target``, ``kd_weight``) a trial's params name, or None."""
    if "flops_target" in params and "kd_weight" in params:
        return {"flops_target": float(params["flops_target"]), "kd_weight": float(params["kd_weight"])}
    return None


def candidate_metrics(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, float]:
    """A finalized row's metrics for its run: every metric plus ``macs``, ``params``,
    ``macs_pct`` and ``test_top1_drop`` (relative to the ``base`` row, the unpruned baseline) and
    ``latency_ms`` (batch 1, median)."""
    metrics = {"macs": row["macs"], "params": row["params"], **row["metrics"]}
    if base is not None and base["macs"]:
        metrics["macs_pct"] = 100.0 * row["macs"] / base["macs"]
    if base is not None and "test_top1" in base["metrics"] and "test_top1" in row["metrics"]:
        # Rounded: a difference of two accuracies would show float noise (0.09999999999999998) in the UI.
        metrics["test_top1_drop"] = round(base["metrics"]["test_top1"] - row["metrics"]["test_top1"], 9)
    if "latency_ms_b1_p50" in row["metrics"]:
        metrics["latency_ms"] = row["metrics"]["latency_ms_b1_p50"]
    return metrics


class SweepTracker:
    """The sweep driver's single writer to MLflow and ``subnets.parquet``.

    ``tracking_uri`` None means ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the
    working directory; ``workdir`` holds ``subnets.parquet``; ``say`` receives the notes meant
    for the user, one line each (default: none are shown). An unreachable server raises
    :class:`~rayprune.tracking.TrackingError` within seconds.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "rayprune",
        workdir: str | Path = ".",
        *,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.runs = RunWriter(tracking_uri, experiment)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Journaled, folded into the Parquet file at most every COMPACT_EVERY_S and whenever the
        # fronts are written: a rewrite per reported step costs O(records^2) over a sweep.
        self.store = SubnetStore(self.workdir / SUBNETS_ARTIFACT, compact_every_s=COMPACT_EVERY_S)
        self.liveness = DriverLiveness(self.runs.client, self.runs.tracking_uri)
        self.fronts = FrontsPublisher(self.runs, self.store, say)
        self._cells: dict[str, dict[str, float]] = {}  # trial id -> {"flops_target", "kd_weight"}

    @property
    def client(self) -> Any:
        """The MLflow client every part writes through."""
        return self.runs.client

    @property
    def experiment_id(self) -> str:
        return self.runs.experiment_id

    @property
    def sweep_id(self) -> str | None:
        return self.runs.sweep_id

    @property
    def parent_run_id(self) -> str | None:
        return self.runs.parent_run_id

    # -- the sweep --------------------------------------------------------------------------------
    def start_sweep(self, sweep_id: str, resolved_config: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """Open (or, on resume, reopen) the parent run of ``sweep_id``; returns its run id. First
        closes, as interrupted, the runs that dead drivers left RUNNING in the experiment; then
        records this driver on the parent run and keeps its heartbeat (:mod:`.liveness`)."""
        self.liveness.close_dead_drivers(self.experiment_id)
        parent = self.runs.open_parent(sweep_id, resolved_config, {**(tags or {}), **driver_tags()})
        if parent is not None:
            for trial_id, params in self.runs.reattach_children().items():
                self._remember_cell(trial_id, cell_of(params))
            if not len(self.store):
                # The sweep driver replays the steps reported since from Tune's results: resumed
                # trials continue after their last checkpoint and never report them again.
                self.store.add(self.runs.logged_subnet_rows())
        self.liveness.hold(self.runs.parent, {**(tags or {}), SWEEP_TAG: sweep_id}, parent)
        return self.runs.parent

    def finish(self, status: str = "FINISHED") -> None:
        """Update the fronts one last time and close the parent run."""
        self._require_sweep()
        self.update_front()
        self._close(run_status(status))

    def fail(self, status: str = "FAILED") -> None:
        """Mark the parent run FAILED (the sweep raised) or KILLED (interrupted); ``--resume``
        reopens it."""
        self._require_sweep()
        self.store.flush()
        self._close(run_status(status))

    def _close(self, status: str) -> None:
        self.liveness.release(status)
        self.runs.close_parent(status)

    def _require_sweep(self) -> None:
        if self.parent_run_id is None:
            raise RuntimeError("SweepTracker: call start_sweep(...) first")

    # -- records ----------------------------------------------------------------------------------
    def log_unpruned(self, record: dict[str, Any]) -> None:
        """Record the unpruned baseline (``SubnetRecord.to_dict()``-like, with test_top1,
        robust_top1 and latency): the reference of MACs%, of the accuracy drop and of ``pick``'s
        --max-drop; logged on the parent run as ``unpruned_*`` metrics."""
        self._require_sweep()
        row = record_row(record, trial_id="unpruned", kind="unpruned", sweep_id=str(self.sweep_id), step=0)
        if self.store.add([row]):
            metrics = {
                "unpruned_macs": row["macs"],
                "unpruned_params": row["params"],
                **{f"unpruned_{k}": v for k, v in row["metrics"].items()},
            }
            self.runs.log_metrics(self.runs.parent, metrics)

    def trial_started(self, trial_id: str, params: dict[str, Any] | None = None, run_name: str | None = None) -> str:
        """The child run of ``trial_id`` (created once; reopened on resume); returns its id.
        ``run_name`` is what the UI lists (e.g. Tune's ``ast_f0.5_kd0.9_<id>``; default the id)."""
        self._require_sweep()
        trial_id = str(trial_id)
        self._remember_cell(trial_id, cell_of(params or {}))
        return self.runs.trial_run(trial_id, flatten_params(params or {}), run_name)

    def log_trial_params(self, trial_id: str, params: dict[str, Any]) -> None:
        """Add ``params`` known only once the trial ran (e.g. its subnet's realised rates) to its
        run; keys the run already has keep their value (MLflow params are write-once)."""
        if not params:
            return
        run_id = self._trial_run(str(trial_id))
        self.runs.log_new_params(run_id, flatten_params(params), self.client.get_run(run_id).data.params)

    def log_step(
        self,
        trial_id: str,
        step: int,
        metrics: dict[str, Any],
        subnets: Iterable[dict[str, Any]],
        cell: dict[str, float] | None = None,
    ) -> int:
        """Record one reported step: its metrics on the trial run (once per step) and its
        subnet records (``SubnetRecord.to_dict()``) in the registry. ``cell`` (flops_target,
        kd_weight) defaults to what the trial's params said. Returns how many records were new."""
        trial_id = str(trial_id)
        self._remember_cell(trial_id, cell)
        run_id = self._trial_run(trial_id)
        rows = [self._row(s, trial_id, "search", run_id=run_id, step=step) for s in subnets]
        added = self.store.add(rows)
        self.runs.log_step(trial_id, step, {**numeric_metrics(metrics), "subnets_in_step": len(rows)})
        return added

    def trial_finished(
        self,
        trial_id: str,
        final: dict[str, Any] | None = None,
        artifacts_dir: str | Path | None = None,
        status: str = "FINISHED",
        *,
        refresh_front: bool = True,
        cell: dict[str, float] | None = None,
    ) -> None:
        """Close a trial: its final record (``SubnetRecord.to_dict()`` with test metrics) and
        saved subnet directory (spec.json, weights.pt, metrics.json) on the trial run, its
        subnet table, and the run status (FINISHED / FAILED / KILLED). Then, unless
        ``refresh_front`` is False, :meth:`update_front`: the front follows finished trials."""
        trial_id = str(trial_id)
        self._remember_cell(trial_id, cell)
        run_id = self._trial_run(trial_id)
        artifact_uri = self.runs.log_subnet_dir(run_id, artifacts_dir)
        own = self.store.rows(("search", "final"), trial_id)  # fine-tunes have their own runs
        metrics: dict[str, Any] = {}
        tags: dict[str, str] = {}
        if final is not None:
            row = self._row(final, trial_id, "final", run_id=run_id, artifact_uri=artifact_uri)
            if self.store.add([row]):
                own.append(row)
                metrics = {"macs": row["macs"], "params": row["params"], **row["metrics"]}
                tags["rayprune.final_spec_hash"] = row["spec_hash"]
        self.runs.close_trial_run(run_id, [table_row(r) for r in own], metrics, tags, status)
        if refresh_front:
            self.update_front()

    def log_finetuned(
        self,
        record: dict[str, Any],
        artifacts_dir: str | Path | None = None,
        *,
        trial_id: str,
        cell: str,
        flops_target: float | None = None,
        kd_weight: float | None = None,
    ) -> str:
        """Record a grid cell's chosen subnet fine-tuned with the sweep's final recipe:
        ``record`` is its ``SubnetRecord.to_dict()`` (test and robust accuracy, latency, the
        recipe in its source), ``artifacts_dir`` its saved subnet, ``trial_id`` the trial that
        chose it, ``cell`` the cell's name (``ast_f0.5_kd0.9``). One child run per cell
        (``finetune-<cell>``), whose metrics include ``macs_pct`` and ``latency_ms`` so the
        MLflow UI's table and charts show the front. Returns the run id."""
        self._require_sweep()
        source = record.get("source") or {}
        params = {
            "cell": cell,
            "trial_id": str(trial_id),
            "method": record.get("method", ""),
            "flops_target": flops_target,
            "kd_weight": kd_weight,
            "recipe": source.get("recipe_tag"),
            "init": source.get("init"),
            "search_mode": source.get("search_mode"),  # "front": a point the front mode chose
        }
        run_id = self.runs.finetune_run(
            cell, str(trial_id), flatten_params({k: v for k, v in params.items() if v is not None})
        )
        artifact_uri = self.runs.log_subnet_dir(run_id, artifacts_dir)
        row = record_row(
            record,
            trial_id=str(trial_id),
            kind="finetuned",
            sweep_id=str(self.sweep_id),
            run_id=run_id,
            artifact_uri=artifact_uri,
            flops_target=flops_target,
            kd_weight=kd_weight,
        )
        if self.store.add([row]):
            self.runs.log_metrics(run_id, candidate_metrics(row, baseline_row(self.store.rows(("unpruned",)))))
        self.runs.close_run(run_id, "FINISHED")
        return run_id

    def log_latency(self, row: dict[str, Any], metrics: dict[str, float], setting: dict[str, Any]) -> None:
        """Replace a finalized row's latency by a measurement made in isolation (``metrics``:
        ``latency_ms_b<B>_p50/_p90/_spread``; ``setting``: backend, device, threads, node, ...):
        in the store (its metrics, and ``source["latency"]`` in place of any shared-GPU flag), on
        its run (the metrics, ``latency_ms`` for a fine-tuned cell, ``latency.*`` params) and, for
        the unpruned baseline, as ``unpruned_latency_*`` metrics on the parent run."""
        self._require_sweep()
        kept = {k: v for k, v in row["metrics"].items() if not k.startswith("latency_")}
        source = {k: v for k, v in row["source"].items() if k != "latency_shared_gpu"}
        updated = {**row, "metrics": {**kept, **metrics}, "source": {**source, "latency": setting}}
        self.store.replace(updated)
        params = flatten_params({"latency": setting})
        run_id: str | None
        if row["kind"] == "unpruned":
            run_id, shown = self.runs.parent, {f"unpruned_{k}": v for k, v in metrics.items()}
        else:
            run_id, shown = row.get("run_id"), dict(metrics)
            if row["kind"] == "finetuned" and "latency_ms_b1_p50" in metrics:
                shown["latency_ms"] = metrics["latency_ms_b1_p50"]
        if run_id:
            self.runs.log_metrics(run_id, shown)
            self.runs.log_new_params(run_id, params, self.client.get_run(run_id).data.params)

    def _remember_cell(self, trial_id: str, cell: dict[str, float] | None) -> None:
        if cell is not None:
            self._cells[trial_id] = dict(cell)

    def _trial_run(self, trial_id: str) -> str:
        self._require_sweep()
        return self.runs.open_trial_run(trial_id)

    def _row(self, record: dict[str, Any], trial_id: str, kind: str, **where: Any) -> dict[str, Any]:
        """A store row of ``record`` in the trial's grid cell (as far as it is known)."""
        cell = self._cells.get(trial_id, {})
        return record_row(
            record,
            trial_id=trial_id,
            kind=kind,
            sweep_id=str(self.sweep_id),
            flops_target=cell.get("flops_target"),
            kd_weight=cell.get("kd_weight"),
            **where,
        )

    # -- fronts (FrontsPublisher) -----------------------------------------------------------------
    def update_front(self) -> Fronts:
        """Publish the fronts now (:meth:`.FrontsPublisher.update`): at the end of a sweep, on
        resume, and through :meth:`publish_if_due` as trials finish. Returns the fronts."""
        self._require_sweep()
        return self.fronts.update()

    def publish_if_due(self, every_s: float = PUBLISH_EVERY_S) -> bool:
        """:meth:`update_front` unless one ran in the last ``every_s`` seconds; True when it ran."""
        self._require_sweep()
        return self.fronts.publish_if_due(every_s)

    def note_cell(self, method: str, flops_target: float, kd_weight: float) -> bool:
        """Say once when a cell's budgets do not bind (:meth:`.FrontsPublisher.note_cell`)."""
        return self.fronts.note_cell(CellKey(method, flops_target, kd_weight))

    def log_study_progress(self, rows: list[dict[str, Any]]) -> None:
        """Put the shared studies' progress on the parent run: the best objective against the
        trial count per (method, KD weight) (:mod:`.study_plot`), and the told trials as a table."""
        self._require_sweep()
        with tempfile.TemporaryDirectory() as tmp:
            plot = plot_best_objective(rows, Path(tmp) / Path(PLOT_ARTIFACT).name)
            self.runs.log_parent_artifact(plot, str(Path(PLOT_ARTIFACT).parent))
        self.runs.log_table(self.runs.parent, rows, TABLE_ARTIFACT)

    def cell_stats(self) -> list[dict[str, Any]]:
        """Per grid cell of the trials' finals (:func:`.publisher.cell_stats`)."""
        return self.fronts.cell_stats()

    def front_table(self) -> str:
        """The fronts as printable text tables (what ``rayprune front`` shows)."""
        return self.fronts.front_table()


__all__ = ["COMPACT_EVERY_S", "PUBLISH_EVERY_S", "SweepTracker", "candidate_metrics", "cell_of"]
