"""The fronts as a figure (matplotlib, no pyplot): what the sweep's parent run shows as
``pareto/pareto.png``. Pure plotting over store rows; no MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .pareto import (
    FRONT_METRIC,
    MODES,
    baseline_row,
    choose_operating_point,
    finalized_pool,
    front_kind,
    suggested_max_drop,
)


def plot_fronts(
    rows: list[dict[str, Any]],
    fronts: dict[str, list[dict[str, Any]]],
    path: str | Path,
    picks: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """The fronts as a PNG (see :func:`front_figure`)."""
    front_figure(rows, fronts, picks).savefig(path, dpi=110)
    return Path(path)


_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
_GROUP_STYLES = ("-", "--", ":", "-.")


def default_picks(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What ``rayprune pick --mode M`` would choose with default options, or with the
    :func:`~.pareto.suggested_max_drop` the sweep prints when nothing is within the default
    drop, per mode (labelled ``"<mode> pick (max-drop D)"``)."""
    drop = suggested_max_drop(rows)
    picks: dict[str, dict[str, Any]] = {}
    if drop is None:
        return picks
    for mode in MODES:
        try:
            picks[f"{mode} pick (max-drop {drop:g})"] = choose_operating_point(rows, mode, max_drop=drop)[0]
        except Exception:
            continue
    return picks


def front_figure(
    rows: list[dict[str, Any]], fronts: dict[str, list[dict[str, Any]]], picks: dict[str, dict[str, Any]] | None = None
) -> Any:
    """Three panels against MACs (% of the unpruned baseline; MACs in millions on top):

    ``picks`` maps a label to a picked row (default :func:`default_picks`).

    * **test top-1**: every equally-treated finalized subnet (the end-of-sweep fine-tunes),
      coloured by method, one marker per KD weight; the trials' own finals (short search
      recipe, never ranked against them) as hollow markers; the final fronts as staircases
      (one per recipe group), the baseline as a horizontal line, the FLOPs targets as vertical
      lines, the picked points (``picks``, default: :func:`default_picks`) ringed;
    * **robust top-1** (corruption accuracy): the same, with the robust fronts;
    * **search val_top1**: every search-time subnet, one staircase front per method (val_top1
      is measured differently by each method: it is never mixed with test accuracy).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg canvas by default

    picks = default_picks(rows) if picks is None else picks
    base = baseline_row(rows)
    ref = base["macs"] if base else max((r["macs"] for r in rows), default=1)
    pct = lambda r: 100.0 * r["macs"] / ref  # noqa: E731  # a one-line formula over ref
    methods = sorted({r["method"] for r in rows if r["kind"] != "unpruned"})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    kds: list[float | None] = list(sorted({float(r["kd_weight"]) for r in rows if r.get("kd_weight") is not None}))
    markers = {kd: _MARKERS[i % len(_MARKERS)] for i, kd in enumerate(kds)}
    pool = finalized_pool(rows)
    trial_finals = [r for r in rows if r["kind"] == "final"] if pool and pool[0]["kind"] == "finetuned" else []
    targets = sorted({float(r["flops_target"]) for r in rows if r.get("flops_target") is not None})

    # Fixed margins, not layout="constrained": the layout engine cost a third of each plot's CPU
    # time, and the driver draws this figure at every resume and at the end of every sweep. The
    # panels' labels are of known length (accuracies in [0, 1], percentages), so fixed room fits.
    fig = Figure(figsize=(17, 5.2))
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.1, top=0.8, wspace=0.2)
    test_ax, robust_ax, search_ax = fig.subplots(1, 3)
    for ax, kind in ((test_ax, "final"), (robust_ax, "robust")):
        metric = FRONT_METRIC[kind]
        for method in methods:
            for kd in kds or [None]:
                group = [
                    r
                    for r in pool
                    if r["method"] == method
                    and (kd is None or r.get("kd_weight") == kd)
                    and r["metrics"].get(metric) is not None
                ]
                if group:
                    ax.scatter(
                        [pct(r) for r in group],
                        [r["metrics"][metric] for r in group],
                        s=42,
                        color=colors[method],
                        marker=markers.get(kd, "o"),
                        zorder=3,
                        label=f"{method}" + ("" if kd is None else f" kd {kd:g}"),
                        gid="finalized",
                    )
        hollow = [r for r in trial_finals if r["metrics"].get(metric) is not None]
        if hollow:
            ax.scatter(
                [pct(r) for r in hollow],
                [r["metrics"][metric] for r in hollow],
                s=22,
                facecolors="none",
                edgecolors=[colors[r["method"]] for r in hollow],
                linewidths=0.8,
                zorder=2,
                alpha=0.7,
                label="trials' own finals (search recipe, not ranked)",
                gid="trial_finals",
            )
        for i, (name, members) in enumerate(n for n in fronts.items() if front_kind(n[0]) == kind):
            if members:
                ax.step(
                    [pct(r) for r in members],
                    [r["metrics"][metric] for r in members],
                    where="post",
                    color="black",
                    linestyle=_GROUP_STYLES[i % len(_GROUP_STYLES)],
                    linewidth=1.2,
                    zorder=4,
                    label=f"{kind} front [{name.split('/', 1)[1]}]",
                    gid="front",
                )
        value = None if base is None else base["metrics"].get(metric)
        if value is not None and value == value:
            ax.axhline(
                value,
                color="tab:red",
                linestyle="--",
                linewidth=1,
                label=f"unpruned baseline ({value:.3f})",
                gid="baseline",
            )
        ax.axvline(100.0, color="tab:red", linestyle=":", linewidth=0.8)
        for mode, row in picks.items():
            if row.get("metrics", {}).get(metric) is not None:
                ax.scatter(
                    [pct(row)],
                    [row["metrics"][metric]],
                    s=220,
                    facecolors="none",
                    edgecolors="black",
                    linewidths=2,
                    marker="o" if mode.startswith("efficient") else "s",
                    zorder=5,
                    label=mode,
                    gid="pick",
                )
    for method in methods:
        searched = [
            r
            for r in rows
            if r["kind"] == "search" and r["method"] == method and r["metrics"].get("val_top1") is not None
        ]
        if searched:
            search_ax.scatter(
                [pct(r) for r in searched],
                [r["metrics"]["val_top1"] for r in searched],
                s=10,
                color=colors[method],
                alpha=0.35,
                label=f"{method} subnets",
                gid="search",
            )
        members = fronts.get(f"search/{method}", [])
        if members:
            search_ax.step(
                [pct(r) for r in members],
                [r["metrics"]["val_top1"] for r in members],
                where="post",
                color=colors[method],
                linewidth=1.5,
                label=f"{method} search front",
                gid="front",
            )
    titles = (
        (test_ax, "test top-1 of fine-tuned subnets", "test top-1"),
        (robust_ax, "robust top-1 (corruption suite)", "robust top-1"),
        (search_ax, "search-val top-1, per method (search time)", "val_top1 (method's search split)"),
    )
    for ax, title, ylabel in titles:
        for target in targets:
            ax.axvline(100.0 * target, color="0.6", linestyle=":", linewidth=1, gid="target")
        ax.set(title=title, xlabel="MACs (% of unpruned)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda p: p * ref / 100e6, lambda m: m * 100e6 / ref))
        top.set_xlabel("MACs (millions)")
        if ax.get_legend_handles_labels()[0]:  # data without labels (only target lines) gets no legend
            ax.legend(loc="lower right", fontsize=7)
    if targets:
        fig.suptitle("dotted verticals: FLOPs targets " + ", ".join(f"{100 * t:g}%" for t in targets), fontsize=9)
    return fig
