"""The shared Optuna studies' progress as a figure: the best objective found against the number
of trials, one line per study (method x KD weight). What the sweep's parent run shows as
``studies/best_objective.png``. Pure plotting over the searcher's told trials; no MLflow.

A row is one told trial (``rayprune.orchestration.search.StudyRounds.history``): ``study``,
``state`` and ``objective`` (the gain in search-val top-1 over the reference budget at the
trial's FLOPs target; None unless complete). Only trials within their MACs constraint
(``flops_fraction <= flops_target``) count as found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_ARTIFACT = "studies/best_objective.png"
TABLE_ARTIFACT = "studies/trials.json"


def best_so_far(rows: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per study, after each of its trials (in the order told): the best objective so far
    (None while no trial counts)."""
    curves: dict[str, list[float | None]] = {}
    best: dict[str, float] = {}
    for row in rows:
        study = str(row["study"])
        objective = row.get("objective")
        if objective is not None and float(row["flops_fraction"]) <= float(row["flops_target"]):
            best[study] = max(best.get(study, float(objective)), float(objective))
        curves.setdefault(study, []).append(best.get(study))
    return curves


def plot_best_objective(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the best objective against the trial count, per study, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg canvas by default

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for study, curve in best_so_far(rows).items():
        points = [(n, y) for n, y in enumerate(curve, start=1) if y is not None]
        if points:
            ax.step(*zip(*points, strict=True), where="post", marker="o", markersize=3, label=study)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("trials told to the study")
    ax.set_ylabel("best gain in search-val top-1\nover the reference budget")
    ax.set_title("Shared Optuna studies (method x KD weight)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return Path(path)
