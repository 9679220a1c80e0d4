"""Pareto fronts over subnet records: plain Python + numpy, no MLflow.

A point is a mapping (e.g. a subnet row) holding numeric objectives, by default ``acc``
(maximised) and ``macs`` (minimised). Point ``a`` *dominates* ``b`` when ``a`` is at least as
good in every objective and strictly better in one.

Rules that make the result deterministic:

* **Duplicates** (equal in every objective) never dominate each other. :func:`pareto_front`
  keeps only the *lowest index* of a group of duplicates, so the front has one entry per
  distinct trade-off; :func:`pareto_ranks` gives every duplicate the same rank.
* **Ties** in one objective are decided by the others: of two points with equal MACs the more
  accurate one dominates; equal accuracy, the cheaper one dominates.
* **Missing values** (absent key, ``None`` or NaN) make a point incomparable: it is never on the
  front and its rank is ``-1``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

_CHUNK = 1024  # rows compared at once: bounds the (chunk x n x objectives) boolean temporaries


def objective_matrix(points: Sequence[Mapping[str, Any]], maximize: Sequence[str],
                     minimize: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Points as an (n, k) float matrix where smaller is better (maximised columns negated),
    plus a boolean mask of the points whose objectives are all present and finite."""
    keys = [(k, -1.0) for k in maximize] + [(k, 1.0) for k in minimize]
    if not keys:
        raise ValueError("pareto: give at least one objective to maximize or minimize")
    values = np.full((len(points), len(keys)), np.nan)
    for i, point in enumerate(points):
        for j, (key, sign) in enumerate(keys):
            value = point.get(key)
            if value is not None:
                values[i, j] = sign * float(value)
    return values, ~np.isnan(values).any(axis=1)


def _non_dominated(values: np.ndarray) -> np.ndarray:
    """Boolean mask of rows not dominated by any other row (all rows valid, minimisation)."""
    keep = np.ones(len(values), dtype=bool)
    for start in range(0, len(values), _CHUNK):
        rows = values[start:start + _CHUNK, None, :]  # (c, 1, k) against (1, n, k)
        no_worse = (values[None, :, :] <= rows).all(axis=2)
        better = (values[None, :, :] < rows).any(axis=2)
        keep[start:start + _CHUNK] = ~(no_worse & better).any(axis=1)
    return keep


def pareto_ranks(points: Sequence[Mapping[str, Any]], maximize: Sequence[str] = ("acc",),
                 minimize: Sequence[str] = ("macs",)) -> list[int]:
    """Non-dominated sorting: rank 0 is the front, rank 1 the front once rank 0 is removed,
    and so on. Duplicates share a rank; points with a missing objective get ``-1``."""
    values, valid = objective_matrix(points, maximize, minimize)
    ranks = np.full(len(points), -1, dtype=int)
    remaining = np.flatnonzero(valid)
    rank = 0
    while remaining.size:
        layer = _non_dominated(values[remaining])
        ranks[remaining[layer]] = rank
        remaining = remaining[~layer]
        rank += 1
    return ranks.tolist()


def pareto_front(points: Sequence[Mapping[str, Any]], maximize: Sequence[str] = ("acc",),
                 minimize: Sequence[str] = ("macs",)) -> list[int]:
    """Indices (ascending) of the non-dominated points, one per distinct objective vector
    (the lowest index among duplicates). Points with a missing objective are skipped."""
    values, valid = objective_matrix(points, maximize, minimize)
    candidates = np.flatnonzero(valid)
    if candidates.size == 0:
        return []
    front = candidates[_non_dominated(values[candidates])]
    # np.unique(return_index) gives each distinct row's first occurrence: the lowest index.
    _, first = np.unique(values[front], axis=0, return_index=True)
    return sorted(int(i) for i in front[first])


def hypervolume_2d(points: Sequence[Mapping[str, Any]], acc_key: str = "acc", cost_key: str = "macs",
                   ref_cost: float | None = None, ref_acc: float = 0.0) -> float:
    """Area dominated by the (acc up, cost down) front and bounded by the reference point
    (``ref_cost``, ``ref_acc``); ``ref_cost`` defaults to the largest cost among the points.
    Grows as the front improves, so it tracks sweep progress in one number."""
    front = [points[i] for i in pareto_front(points, (acc_key,), (cost_key,))]
    if not front:
        return 0.0
    if ref_cost is None:
        ref_cost = max(float(p[cost_key]) for p in points if p.get(cost_key) is not None)
    area, best_acc = 0.0, ref_acc
    # Staircase from the cheapest front point up: each point adds the strip between its own
    # accuracy and the best accuracy of the cheaper points, from its cost to ref_cost.
    for point in sorted(front, key=lambda p: float(p[cost_key])):
        acc, cost = float(point[acc_key]), float(point[cost_key])
        if cost >= ref_cost or acc <= best_acc:
            continue
        area += (ref_cost - cost) * (acc - best_acc)
        best_acc = acc
    return area


# --------------------------------------------------------------------------------------------
# Fronts of subnet rows (rows as stored by :mod:`.store`: kind, macs, metrics, ...)
# --------------------------------------------------------------------------------------------

# Which accuracy each front uses. Search-time records carry the search-val accuracy
# ``val_top1`` (the test set is never used during search); only finalized or fine-tuned
# subnets have ``test_top1`` and ``robust_top1``, and only they have weights to export, so the
# "final" fronts -- the ones ``rayprune pick`` chooses from -- use those.
FRONTS: dict[str, tuple[tuple[str, ...], str]] = {
    "search": (("search",), "val_top1"),
    "final": (("final", "finetuned"), "test_top1"),
    "robust": (("final", "finetuned"), "robust_top1"),
}
FRONT_TITLES = {
    "search": "search front: val_top1 vs MACs over every subnet evaluated",
    "final": "final front: test_top1 vs MACs over finalized/fine-tuned subnets",
    "robust": "robust front: robust_top1 vs MACs over finalized/fine-tuned subnets",
}


def front_rows(rows: Sequence[Mapping[str, Any]], kinds: Sequence[str], metric: str) -> list[dict[str, Any]]:
    """The rows of ``kinds`` on the (``metric`` up, MACs down) front, cheapest first."""
    candidates = [r for r in rows if r["kind"] in kinds]
    points = [{"acc": r["metrics"].get(metric), "macs": r["macs"]} for r in candidates]
    members = [candidates[i] for i in pareto_front(points)]
    return sorted(members, key=lambda r: (r["macs"], -r["metrics"][metric]))


def compute_fronts(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """All :data:`FRONTS` of a sweep's rows: ``{"search": [...], "final": [...], "robust": [...]}``."""
    return {name: front_rows(rows, kinds, metric) for name, (kinds, metric) in FRONTS.items()}


_TABLE_COLUMNS = (  # header, how to format a row's value
    ("trial", lambda r: r["trial_id"]), ("kind", lambda r: r["kind"]), ("step", lambda r: str(r["step"])),
    ("method", lambda r: r["method"]), ("MACs(M)", lambda r: f"{r['macs'] / 1e6:.2f}"),
    ("params(K)", lambda r: f"{r['params'] / 1e3:.1f}"),
)
_METRIC_COLUMNS = ("val_top1", "test_top1", "robust_top1", "latency_ms_b1_p50")


def format_table(rows: Sequence[Mapping[str, Any]], reference_macs: int | None = None) -> str:
    """Rows as an aligned text table; with ``reference_macs`` (the unpruned model's) a
    ``MACs%`` column shows each subnet's fraction of it."""
    columns = list(_TABLE_COLUMNS)
    if reference_macs:
        columns.append(("MACs%", lambda r: f"{100.0 * r['macs'] / reference_macs:.1f}"))
    columns += [(m, lambda r, m=m: _metric_cell(r["metrics"].get(m))) for m in _METRIC_COLUMNS]
    cells = [[header for header, _ in columns]] + [[fmt(r) for _, fmt in columns] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _metric_cell(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"


# --------------------------------------------------------------------------------------------
# Operating points (``rayprune pick``)
# --------------------------------------------------------------------------------------------

MODES = ("efficient", "robust")


def choose_operating_point(rows: Sequence[Mapping[str, Any]], mode: str, *, max_macs: float | None = None,
                           min_acc: float | None = None, max_drop: float = 0.01) -> tuple[dict[str, Any], str]:
    """Pick one exportable subnet (a finalized/fine-tuned row with saved weights and
    ``test_top1``) and say why, as ``(row, selection sentence)``.

    * ``efficient``: the fewest MACs among subnets whose ``test_top1`` is within ``max_drop``
      (a fraction: 0.01 = one point) of the best candidate's; ties go to higher accuracy.
    * ``robust``: the highest ``robust_top1``; ties go to fewer MACs.

    ``max_macs`` (MACs <= limit) and ``min_acc`` (``test_top1`` >= it) filter the candidates
    first. Raises :class:`TrackingError` naming the filter when nothing qualifies.
    """
    from . import TrackingError

    if mode not in MODES:
        raise TrackingError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    metric = "robust_top1" if mode == "robust" else "test_top1"
    pool = [r for r in rows if r["kind"] in FRONTS["final"][0] and r.get("artifact_uri")
            and r["metrics"].get("test_top1") is not None and r["metrics"].get(metric) is not None]
    if not pool:
        raise TrackingError(f"no fine-tuned subnet with saved weights and {metric} yet: let trials finish "
                            "(or the sweep fine-tune its front) before picking")
    if max_macs is not None:
        cheapest = min(r["macs"] for r in pool)
        pool = [r for r in pool if r["macs"] <= max_macs]
        if not pool:
            raise TrackingError(f"--max-macs {max_macs:,.0f} is impossible: the cheapest fine-tuned subnet has "
                                f"{cheapest:,} MACs; raise --max-macs")
    if min_acc is not None:
        best = max(r["metrics"]["test_top1"] for r in pool)
        pool = [r for r in pool if r["metrics"]["test_top1"] >= min_acc]
        if not pool:
            raise TrackingError(f"--min-acc {min_acc:g} is impossible: the best test_top1 among the candidates is "
                                f"{best:.4f}; lower --min-acc (a fraction in [0, 1])")
    if mode == "robust":
        chosen = min(pool, key=lambda r: (-r["metrics"]["robust_top1"], r["macs"], _row_id(r)))
        why = "highest robust_top1"
    else:
        best = max(r["metrics"]["test_top1"] for r in pool)
        eligible = [r for r in pool if r["metrics"]["test_top1"] >= best - max_drop - 1e-12]
        chosen = min(eligible, key=lambda r: (r["macs"], -r["metrics"]["test_top1"], _row_id(r)))
        why = f"fewest MACs with test_top1 >= {best:.4f} - {max_drop:g} (best candidate minus --max-drop)"
    limits = []
    if max_macs is not None:
        limits.append(f"MACs <= {max_macs:,.0f}")
    if min_acc is not None:
        limits.append(f"test_top1 >= {min_acc:g}")
    scope = f" among subnets with {' and '.join(limits)}" if limits else ""
    return dict(chosen), f"{why}{scope} ({len(pool)} candidates)"


def _row_id(row: Mapping[str, Any]) -> tuple:
    # The store key's fields: a deterministic last tie-break.
    return (str(row["trial_id"]), row["kind"], int(row["step"]), row["spec_hash"])
