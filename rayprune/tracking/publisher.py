"""Publishing a sweep's fronts and per-cell counts to its parent run while it runs.

:class:`FrontsPublisher` recomputes the fronts (:func:`~.pareto.compute_fronts`) over every
record of the subnet store, tags the child runs owning a member (``rayprune.is_pareto[_final|
_robust]``) and logs to the parent run: the fronts as tables (``pareto/front_<kind>_<group>.json``),
the plot ``pareto/pareto.png``, the whole registry ``subnets.parquet``, and the metrics
``front_size/<front>``, ``hypervolume/<search front>`` and, per grid cell,
``cells/<cell>/{distinct_subnets,reused_trials,outside_window}`` (step: the records so far, which a
resume does not restart). Each publication uploads the whole registry, so the driver publishes at
the end of a sweep, on resume, and as trials finish at most every :data:`PUBLISH_EVERY_S`. The plot
takes about a CPU second to draw, so the publications while trials finish redraw it at most every
:data:`PUBLISH_EVERY_S` counted from the sweep's start (a sweep shorter than that draws it once,
at the end); the tables and the registry are always current.

The per-cell counts (:func:`cell_stats`) come from the trials' finals. When every trial of a cell
chose one subnet under their different budgets, :meth:`FrontsPublisher.note_cell` tags the parent
run and says so once through the ``say`` callable it was given: this module never prints, the
driver decides where its notes go.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..grid import CellKey
from .mlflow_writer import RunWriter
from .pareto import FRONT_KINDS, baseline_row, compute_fronts, format_fronts, front_kind, front_pool, hypervolume_2d
from .plots import plot_fronts
from .store import SubnetStore, table_row

#: How stale, at most, a running (or killed) sweep's fronts and ``subnets.parquet`` in MLflow may
#: get: the first finished trial publishes them at once, later ones when this much time has passed.
PUBLISH_EVERY_S = 300.0

Fronts = dict[str, list[dict[str, Any]]]  # front name -> members (pareto.compute_fronts)


def cell_stats(finals: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per grid cell of the trials' ``finals`` rows, sorted by cell: ``cell`` (its name),
    ``trials``, ``distinct`` (different chosen subnets), ``reused`` (trials whose subnet came from
    the final-phase cache), ``outside_window`` (trials whose subnet is not in ``[0.9, 1] x`` the
    target MACs)."""
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in finals:
        key = (row["method"], row.get("flops_target"), row.get("kd_weight"))
        entry = cells.setdefault(key, {"trials": 0, "specs": set(), "reused": 0, "outside": 0})
        entry["trials"] += 1
        entry["specs"].add(row["spec_hash"])
        entry["reused"] += bool(row["source"].get("reused_from"))
        entry["outside"] += (row["source"].get("window") or {}).get("status", "in_window") != "in_window"
    out = []
    for (method, target, kd), entry in sorted(cells.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        out.append(
            {
                "cell": method if target is None else str(CellKey(method, target, kd or 0)),
                "trials": entry["trials"],
                "distinct": len(entry["specs"]),
                "reused": entry["reused"],
                "outside_window": entry["outside"],
            }
        )
    return out


def budgets_do_not_bind(stats: dict[str, Any]) -> str:
    """The note for a cell (:func:`cell_stats` entry) whose trials all chose one subnet."""
    return (
        f"rayprune: cell {stats['cell']}: its {stats['trials']} trials all chose the same subnet under different "
        f"Optuna budgets: the per-stage budgets do not bind there ({stats['reused']} trial(s) reused the "
        "cached training instead of repeating it); narrow optuna.stage_prune or lower samples_per_cell"
    )


def front_owners(fronts: Fronts) -> dict[str, set[str]]:
    """The run ids owning a member of each front kind (``search``, ``final``, ``robust``)."""
    owners: dict[str, set[str]] = {kind: set() for kind in FRONT_KINDS}
    for name, members in fronts.items():
        owners[front_kind(name)].update(r["run_id"] for r in members)
    return owners


def _silent(line: str) -> None:
    """A ``say`` that drops the note (the parent-run tag still records it)."""


class FrontsPublisher:
    """Publishes the fronts of ``store``'s records to the parent run ``runs`` holds open; notes go
    to ``say`` (one line each; default: dropped)."""

    def __init__(self, runs: RunWriter, store: SubnetStore, say: Callable[[str], None] | None = None) -> None:
        self.runs, self.store = runs, store
        self.say = say or _silent
        self._published_at: float | None = None  # time.monotonic() of the last publication
        self._plotted_at = time.monotonic()  # of the last plot; the start counts as one (module docstring)
        self._noted: set[str] = set()  # cells already reported as "budgets do not bind"

    def update(self, plot: bool = True) -> Fronts:
        """Recompute the fronts over every record so far and publish them (see the module
        docstring), with the plot unless ``plot`` is False. Returns the fronts
        (:func:`~.pareto.compute_fronts`)."""
        rows = self.store.rows()
        fronts = compute_fronts(rows)
        self.runs.tag_front_members(front_owners(fronts))
        for name, members in fronts.items():
            self.runs.log_table(
                self.runs.parent, [table_row(r) for r in members], f"pareto/front_{name.replace('/', '_')}.json"
            )
        if plot:
            with tempfile.TemporaryDirectory() as tmp:
                figure = Path(tmp) / "pareto.png"
                plot_fronts(rows, fronts, figure)
                self.runs.log_parent_artifact(figure, "pareto")
            self._plotted_at = time.monotonic()
        self.store.flush()
        if self.store.path.exists():
            self.runs.log_parent_artifact(self.store.path)
        self._log_front_metrics(rows, fronts)
        self._published_at = time.monotonic()
        return fronts

    def publish_if_due(self, every_s: float = PUBLISH_EVERY_S) -> bool:
        """:meth:`update` unless one ran in the last ``every_s`` seconds; True when it ran.

        The driver calls it as trials finish, so ``rayprune front``, ``pick`` and the MLflow UI
        show a long sweep's progress, and a sweep whose driver was killed keeps the fronts of
        what it finished, at the cost of one upload of the registry per ``every_s``. The plot
        comes with it only once ``every_s`` has passed since the last one (or the start)."""
        now = time.monotonic()
        if self._published_at is not None and now - self._published_at < every_s:
            return False
        self.update(plot=now - self._plotted_at >= every_s)
        return True

    def cell_stats(self) -> list[dict[str, Any]]:
        """:func:`cell_stats` of the trials' finals so far."""
        return cell_stats(self.store.rows(("final",)))

    def note_cell(self, cell: CellKey) -> bool:
        """After a trial of ``cell`` finished: when all of its (>= 2) trials chose one subnet
        under their different budgets, say once that the budgets do not bind there (a note and
        a parent-run tag). Returns True when it said so now."""
        name = str(cell)
        if name in self._noted:
            return False
        stats = next((s for s in self.cell_stats() if s["cell"] == name), None)
        if stats is None or stats["trials"] < 2 or stats["distinct"] != 1:
            return False
        self._noted.add(name)
        self.say(budgets_do_not_bind(stats))
        self.runs.tag_parent(f"rayprune.budgets_do_not_bind.{name}", "true")
        return True

    def front_table(self) -> str:
        """The fronts as printable text tables (what ``rayprune front`` shows)."""
        return format_fronts(self.store.rows())

    def _log_front_metrics(self, rows: list[dict[str, Any]], fronts: Fronts) -> None:
        base = baseline_row(rows)
        reference = base["macs"] if base else None
        metrics: dict[str, float] = {f"front_size/{name}": len(members) for name, members in fronts.items()}
        for name in fronts:
            if front_kind(name) == "search":
                points = [{"acc": r["metrics"].get("val_top1"), "macs": r["macs"]} for r in front_pool(rows, name)]
                metrics[f"hypervolume/{name}"] = hypervolume_2d(points, ref_cost=reference)
        for stats in self.cell_stats():
            metrics[f"cells/{stats['cell']}/distinct_subnets"] = stats["distinct"]
            metrics[f"cells/{stats['cell']}/reused_trials"] = stats["reused"]
            metrics[f"cells/{stats['cell']}/outside_window"] = stats["outside_window"]
        # step = records so far: monotone, and the same after a resume (a counter would restart)
        self.runs.log_metrics(self.runs.parent, metrics, step=len(self.store))


__all__ = ["PUBLISH_EVERY_S", "FrontsPublisher", "budgets_do_not_bind", "cell_stats", "front_owners"]
