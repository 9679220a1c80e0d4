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

The fronts of a sweep's rows print as titled text tables (:func:`format_fronts`): what
``rayprune front`` and the end of a sweep show.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..tables import aligned

_CHUNK = 1024  # rows compared at once: bounds the (chunk x n x objectives) boolean temporaries


def objective_matrix(
    points: Sequence[Mapping[str, Any]], maximize: Sequence[str], minimize: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
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
        rows = values[start : start + _CHUNK, None, :]  # (c, 1, k) against (1, n, k)
        no_worse = (values[None, :, :] <= rows).all(axis=2)
        better = (values[None, :, :] < rows).any(axis=2)
        keep[start : start + _CHUNK] = ~np.any(no_worse & better, axis=1)
    return keep


def pareto_ranks(
    points: Sequence[Mapping[str, Any]], maximize: Sequence[str] = ("acc",), minimize: Sequence[str] = ("macs",)
) -> list[int]:
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


def pareto_front(
    points: Sequence[Mapping[str, Any]], maximize: Sequence[str] = ("acc",), minimize: Sequence[str] = ("macs",)
) -> list[int]:
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


def hypervolume_2d(
    points: Sequence[Mapping[str, Any]],
    acc_key: str = "acc",
    cost_key: str = "macs",
    ref_cost: float | None = None,
    ref_acc: float = 0.0,
) -> float:
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

# Comparing like with like: a front only ever ranks numbers measured the same way.
#
# * search fronts are per method: val_top1 is measured at a method-specific point of training
#   (l1 right after the cut, AST after an iteration's training), so it ranks within one method;
# * final and robust fronts rank *equally-treated* subnets: fine-tuned with one recipe (epochs,
#   schedule, lr, KD weight, ...), measured on the same test set. The pool is the end-of-sweep
#   fine-tunes (kind ``finetuned``; a sweep without them falls back to the trials' own finals),
#   grouped by recipe: one final and one robust front per recipe group (per KD weight).
FRONT_KINDS = ("search", "final", "robust")
FRONT_METRIC = {"search": "val_top1", "final": "test_top1", "robust": "robust_top1"}
FINALIZED_KINDS = ("final", "finetuned")


def finalized_pool(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The finalized rows the final fronts and ``pick`` rank: the end-of-sweep fine-tunes
    (``finetuned``) when there are any, else the trials' own finals (``final``)."""
    tuned = [dict(r) for r in rows if r["kind"] == "finetuned"]
    return tuned or [dict(r) for r in rows if r["kind"] == "final"]


def _recipe_hash(row: Mapping[str, Any]) -> str:
    return row.get("recipe_hash") or (row.get("source") or {}).get("recipe_hash") or "unknown"


def _kd(row: Mapping[str, Any]) -> float | None:
    if row.get("kd_weight") is not None:
        return float(row["kd_weight"])
    recipe = (row.get("source") or {}).get("recipe") or {}
    return float(recipe["kd_weight"]) if "kd_weight" in recipe else None


def recipe_groups(pool: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by training recipe, labelled ``kd<weight>`` (plus ``-<hash>`` when two
    recipes share a KD weight), in increasing KD weight."""
    by_hash: dict[str, list[dict[str, Any]]] = {}
    for row in pool:
        by_hash.setdefault(_recipe_hash(row), []).append(dict(row))
    kd_of = {h: _kd(members[0]) for h, members in by_hash.items()}
    kd_label = {h: ("kd?" if kd is None else f"kd{kd:g}") for h, kd in kd_of.items()}
    labels = {
        h: (kd_label[h] if list(kd_label.values()).count(kd_label[h]) == 1 else f"{kd_label[h]}-{h[:6]}")
        for h in by_hash
    }
    order = sorted(by_hash, key=lambda h: (kd_of[h] if kd_of[h] is not None else -1.0, labels[h]))
    return {labels[h]: by_hash[h] for h in order}


def front_rows(rows: Sequence[dict[str, Any]], kinds: Sequence[str], metric: str) -> list[dict[str, Any]]:
    """The rows of ``kinds`` on the (``metric`` up, MACs down) front, cheapest first."""
    candidates = [r for r in rows if r["kind"] in kinds]
    points = [{"acc": r["metrics"].get(metric), "macs": r["macs"]} for r in candidates]
    members = [candidates[i] for i in pareto_front(points)]
    return sorted(members, key=lambda r: (r["macs"], -r["metrics"][metric]))


def filter_init(rows: Sequence[Mapping[str, Any]], init: str | None) -> list[dict[str, Any]]:
    """Finalized rows that started from ``init`` (``inherited``/``scratch``); other kinds stay."""
    if init is None:
        return [dict(r) for r in rows]
    return [
        dict(r)
        for r in rows
        if r["kind"] not in FINALIZED_KINDS or r.get("init") == init or (r.get("source") or {}).get("init") == init
    ]


def compute_fronts(rows: Sequence[Mapping[str, Any]], init: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every front of a sweep's rows, by name: ``search/<method>`` (val_top1 vs MACs over that
    method's search-time subnets), then per recipe group ``final/<group>`` (test_top1) and
    ``robust/<group>`` (robust_top1) over the equally-treated finalized subnets. ``init``
    keeps only finalized subnets that started that way."""
    rows = filter_init(rows, init)
    fronts: dict[str, list[dict[str, Any]]] = {}
    for method in sorted({r["method"] for r in rows if r["kind"] == "search"}):
        fronts[f"search/{method}"] = front_rows(
            [r for r in rows if r["kind"] == "search" and r["method"] == method], ("search",), "val_top1"
        )
    for label, group in recipe_groups(finalized_pool(rows)).items():
        fronts[f"final/{label}"] = front_rows(group, FINALIZED_KINDS, "test_top1")
        fronts[f"robust/{label}"] = front_rows(group, FINALIZED_KINDS, "robust_top1")
    return fronts


def front_kind(name: str) -> str:
    """``search``, ``final`` or ``robust`` for a front name of :func:`compute_fronts`."""
    return name.split("/", 1)[0]


def front_pool(rows: Sequence[Mapping[str, Any]], name: str, init: str | None = None) -> list[dict[str, Any]]:
    """The rows a front of :func:`compute_fronts` was computed over."""
    rows = filter_init(rows, init)
    kind, _, label = name.partition("/")
    if kind == "search":
        return [r for r in rows if r["kind"] == "search" and r["method"] == label]
    return recipe_groups(finalized_pool(rows)).get(label, [])


def front_title(name: str, members: Sequence[Mapping[str, Any]]) -> str:
    """A front's heading: what it ranks and over which rows."""
    kind, _, label = name.partition("/")
    if kind == "search":
        return (
            f"search front of {label}: val_top1 vs MACs over its search-time subnets (val_top1 is measured "
            f"where {label} measures it; not comparable across methods)"
        )
    recipe = next((m.get("recipe") or (m.get("source") or {}).get("recipe_tag") for m in members), None)
    what = "test_top1" if kind == "final" else "robust_top1"
    return f"{kind} front [{label}]: {what} vs MACs over the subnets fine-tuned with recipe {recipe or label}"


def baseline_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The unpruned baseline's row, if recorded."""
    return next((dict(r) for r in rows if r["kind"] == "unpruned"), None)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


_Cell = Callable[[Mapping[str, Any], Mapping[str, Any] | None], str]  # (row, baseline) -> table cell
_TABLE_COLUMNS = (  # header, how to format a row's value
    ("trial", lambda r, b: r["trial_id"]),
    ("kind", lambda r, b: r["kind"]),
    ("method", lambda r, b: r["method"]),
    ("target", lambda r, b: "-" if r.get("flops_target") is None else f"{r['flops_target']:g}"),
    ("kd", lambda r, b: "-" if r.get("kd_weight") is None else f"{r['kd_weight']:g}"),
    ("init", lambda r, b: r.get("init") or (r.get("source") or {}).get("init") or "-"),
    ("MACs(M)", lambda r, b: f"{r['macs'] / 1e6:.3f}"),
    ("params(K)", lambda r, b: f"{r['params'] / 1e3:.1f}"),
)
_METRIC_COLUMNS = ("val_top1", "test_top1", "robust_top1")
LATENCY_METRIC = "latency_ms_b1_p50"
LATENCY_SPREAD = "latency_ms_b1_spread"
#: Marks a latency no further from the baseline's than its own spread; :data:`LATENCY_LEGEND` explains it.
WITHIN_SPREAD = "~"
LATENCY_LEGEND = (
    f"{WITHIN_SPREAD} after a latency: its spread over repeated passes is wider than its difference from the "
    "baseline's, so that difference is not measured"
)


def _drop_cell(row: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> str:
    ref = _finite((baseline or {}).get("metrics", {}).get("test_top1"))
    acc = _finite(row["metrics"].get("test_top1"))
    return "-" if ref is None or acc is None or row["kind"] == "unpruned" else f"{ref - acc:+.4f}"


def within_spread(row: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> bool:
    """Whether ``row``'s batch-1 latency spread is wider than its difference from the baseline's."""
    if baseline is None or row is baseline or row["kind"] == "unpruned":
        return False
    lat, spread = _finite(row["metrics"].get(LATENCY_METRIC)), _finite(row["metrics"].get(LATENCY_SPREAD))
    ref = _finite(baseline["metrics"].get(LATENCY_METRIC))
    return lat is not None and spread is not None and ref is not None and spread > abs(lat - ref)


def _latency_cell(row: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> str:
    cell = _metric_cell(row["metrics"].get(LATENCY_METRIC))
    return cell + WITHIN_SPREAD if within_spread(row, baseline) else cell


def format_table(
    rows: Sequence[Mapping[str, Any]], reference_macs: int | None = None, baseline: Mapping[str, Any] | None = None
) -> str:
    """Rows as an aligned text table. With ``reference_macs`` (the unpruned model's) a
    ``MACs%`` column shows each subnet's fraction of it; with ``baseline`` (the unpruned row)
    the baseline is the first line and a ``drop`` column shows its test_top1 minus the row's."""
    columns: list[tuple[str, _Cell]] = list(_TABLE_COLUMNS)
    if baseline is not None and reference_macs is None:
        reference_macs = baseline["macs"]
    if reference_macs:
        columns.insert(7, ("MACs%", lambda r, b: f"{100.0 * r['macs'] / reference_macs:.1f}"))
    columns += [(m, _metric_column(m)) for m in _METRIC_COLUMNS] + [(LATENCY_METRIC, _latency_cell)]
    if baseline is not None:
        columns.insert(len(columns) - 2, ("drop", _drop_cell))
    shown = ([baseline] if baseline is not None else []) + list(rows)
    cells = [[header for header, _ in columns]] + [[fmt(r, baseline) for _, fmt in columns] for r in shown]
    table = aligned(cells)
    return table + "\n" + LATENCY_LEGEND if any(within_spread(r, baseline) for r in rows) else table


def _metric_column(metric: str) -> _Cell:
    return lambda r, b: _metric_cell(r["metrics"].get(metric))


def _metric_cell(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"


# --------------------------------------------------------------------------------------------
# Operating points (``rayprune pick``)
# --------------------------------------------------------------------------------------------

MODES = ("efficient", "robust")
DEFAULT_MAX_DROP = 0.01


def format_baseline(rows: Sequence[dict[str, Any]]) -> str:
    """One line about the unpruned baseline (the reference of MACs% and of every drop)."""
    base = baseline_row(rows)
    if base is None:
        return "unpruned baseline: not recorded"
    m = base["metrics"]
    parts = [f"{base['macs'] / 1e6:.3f}M MACs", f"{base['params'] / 1e3:.1f}K params"]
    parts += [f"{k} {m[k]:.4f}" for k in ("test_top1", "robust_top1") if m.get(k) is not None]
    if m.get("latency_ms_b1_p50") is not None:
        setting = (base.get("source") or {}).get("latency") or {}
        where = f", on {setting['node']} with {setting['threads']} threads" if setting.get("node") else ""
        parts.append(f"latency {m['latency_ms_b1_p50']:.3f} ms (batch 1{where})")
    origin = (base.get("source") or {}).get("init")
    what = "the teacher" if origin == "teacher" else "trained once with recipes.finetune"
    return f"unpruned baseline ({what}): " + ", ".join(parts)


def format_fronts(rows: Sequence[dict[str, Any]], init: str | None = None) -> str:
    """All fronts of a sweep's rows as titled text tables, after a line about the baseline:
    MACs% relative to it and, in final/robust tables, its row first and each subnet's drop
    in test_top1 from it. ``init`` keeps only finalized subnets that started that way."""
    base = baseline_row(rows)
    blocks = [format_baseline(rows)]
    for name, members in compute_fronts(rows, init).items():
        pool = len(front_pool(rows, name, init))
        shown_base = base if front_kind(name) != "search" else None
        table = format_table(members, base["macs"] if base else None, shown_base) if members else "  (empty)"
        blocks.append(f"{front_title(name, members)} -- {len(members)} of {pool}\n{table}")
    return "\n\n".join(blocks)


def choose_operating_point(
    rows: Sequence[Mapping[str, Any]],
    mode: str,
    *,
    max_macs: float | None = None,
    min_acc: float | None = None,
    max_drop: float | None = DEFAULT_MAX_DROP,
    kd_weight: float | None = None,
    init: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Pick one exportable, equally-treated subnet and say why, as ``(row, selection sentence)``.

    The candidates are one recipe group of :func:`finalized_pool` (rows with saved weights and
    ``test_top1``): the group of ``kd_weight``, by default the one with the largest KD weight.
    ``init`` keeps only subnets that started that way. Then:

    * ``max_macs`` (MACs <= limit) and ``min_acc`` (``test_top1`` >= it) filter the candidates;
    * ``max_drop`` (a fraction; None: no limit) keeps those whose ``test_top1`` is at most that
      far below the **unpruned baseline's** test_top1 (the best candidate's, when the sweep has
      no measured baseline);
    * ``efficient``: the fewest MACs; ties go to higher test_top1.
      ``robust``: the highest ``robust_top1`` (corruption accuracy); ties go to fewer MACs.

    Raises :class:`TrackingError` naming the filter when nothing qualifies.
    """
    from . import TrackingError

    if mode not in MODES:
        raise TrackingError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    metric = "robust_top1" if mode == "robust" else "test_top1"
    usable = [
        r
        for r in filter_init(finalized_pool(rows), init)
        if r.get("artifact_uri")
        and _finite(r["metrics"].get("test_top1")) is not None
        and _finite(r["metrics"].get(metric)) is not None
    ]
    if not usable:
        raise TrackingError(
            f"no fine-tuned subnet with saved weights and {metric} yet"
            f"{f' that started {init}' if init else ''}: let the sweep finish (its end fine-tunes "
            "every cell's chosen subnet) before picking"
        )
    groups = recipe_groups(usable)
    if kd_weight is None:
        label = max(groups, key=lambda g: (_kd(groups[g][0]) or 0.0, len(groups[g])))
    else:
        matching = [
            g for g, members in groups.items() if (kd := _kd(members[0])) is not None and abs(kd - kd_weight) < 1e-9
        ]
        if not matching:
            known = ", ".join(f"{_kd(m[0]):g}" for m in groups.values() if _kd(m[0]) is not None)
            raise TrackingError(
                f"--kd-weight {kd_weight:g}: no fine-tuned subnet was trained with that KD weight; "
                f"the sweep has {known or 'none'}"
            )
        label = max(matching, key=lambda g: len(groups[g]))
    pool = groups[label]
    recipe = pool[0].get("recipe") or (pool[0].get("source") or {}).get("recipe_tag") or label
    if max_macs is not None:
        cheapest = min(r["macs"] for r in pool)
        pool = [r for r in pool if r["macs"] <= max_macs]
        if not pool:
            raise TrackingError(
                f"--max-macs {max_macs:,.0f} is impossible: the cheapest fine-tuned subnet has "
                f"{cheapest:,} MACs; raise --max-macs"
            )
    if min_acc is not None:
        best = max(r["metrics"]["test_top1"] for r in pool)
        pool = [r for r in pool if r["metrics"]["test_top1"] >= min_acc]
        if not pool:
            raise TrackingError(
                f"--min-acc {min_acc:g} is impossible: the best test_top1 among the candidates is "
                f"{best:.4f}; lower --min-acc (a fraction in [0, 1])"
            )
    base = baseline_row(rows)
    reference = _finite((base or {}).get("metrics", {}).get("test_top1"))
    ref_name = "the unpruned baseline's test_top1"
    if reference is None:
        reference, ref_name = (
            max(r["metrics"]["test_top1"] for r in pool),
            "the best candidate's test_top1 (no baseline)",
        )
    n_candidates = len(pool)
    if max_drop is not None:
        best = max(r["metrics"]["test_top1"] for r in pool)
        pool = [r for r in pool if r["metrics"]["test_top1"] >= reference - max_drop - 1e-12]
        if not pool:
            raise TrackingError(
                f"--max-drop {max_drop:g} is impossible: {ref_name} is {reference:.4f} and the best "
                f"candidate reaches {best:.4f} (a drop of {reference - best:.4f}); raise --max-drop"
            )
    if mode == "robust":
        chosen = min(pool, key=lambda r: (-r["metrics"]["robust_top1"], r["macs"], _row_id(r)))
        why = "highest robust_top1"
    else:
        chosen = min(pool, key=lambda r: (r["macs"], -r["metrics"]["test_top1"], _row_id(r)))
        why = "fewest MACs"
    limits = []
    if max_drop is not None:
        limits.append(f"test_top1 >= {reference:.4f} - {max_drop:g} ({ref_name} minus --max-drop)")
    if max_macs is not None:
        limits.append(f"MACs <= {max_macs:,.0f}")
    if min_acc is not None:
        limits.append(f"test_top1 >= {min_acc:g}")
    scope = f" with {' and '.join(limits)}" if limits else ""
    started = f", started {init}" if init else ""
    return dict(chosen), (
        f"{why} among the subnets fine-tuned with recipe {recipe}{started}{scope} "
        f"({len(pool)} of {n_candidates} candidates)"
    )


def _row_id(row: Mapping[str, Any]) -> tuple:
    # The store key's fields: a deterministic last tie-break.
    return (str(row["trial_id"]), row["kind"], int(row["step"]), row["spec_hash"])


def suggested_max_drop(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The default ``--max-drop`` when a fine-tuned subnet of the default recipe group meets it;
    otherwise the smallest drop, rounded up to a hundredth, that admits one. None when nothing
    can be picked (no candidates, or no baseline to measure a drop from)."""
    try:
        choose_operating_point(rows, "efficient")
        return DEFAULT_MAX_DROP
    except Exception:
        pass
    try:
        chosen, _ = choose_operating_point(rows, "efficient", max_drop=None)
    except Exception:
        return None
    base = baseline_row(rows)
    reference = _finite((base or {}).get("metrics", {}).get("test_top1"))
    if reference is None:
        return None
    group = [
        r
        for r in finalized_pool(rows)
        if _recipe_hash(r) == _recipe_hash(chosen)
        and r.get("artifact_uri")
        and _finite(r["metrics"].get("test_top1")) is not None
    ]
    best = max(r["metrics"]["test_top1"] for r in group)
    return max(DEFAULT_MAX_DROP, math.ceil((reference - best) * 100 - 1e-9) / 100)
