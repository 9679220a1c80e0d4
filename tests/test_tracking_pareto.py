"""Pareto fronts, ranks, hypervolume and operating-point choice against hand-made points."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from rayprune.tracking import TrackingError
from rayprune.tracking.pareto import (
    choose_operating_point,
    compute_fronts,
    finalized_pool,
    format_table,
    hypervolume_2d,
    pareto_front,
    pareto_ranks,
)

# (acc, macs); the comment says why each point is or is not on the front.
POINTS = [
    (0.90, 100),  # 0 front
    (0.85, 50),  # 1 front
    (0.80, 60),  # 2 dominated by 1
    (0.90, 100),  # 3 duplicate of 0: off the front (lowest index kept), same rank
    (0.90, 120),  # 4 same acc as 0, more MACs: dominated
    (0.85, 50),  # 5 duplicate of 1
    (0.70, 50),  # 6 same MACs as 1, less acc: dominated
    (0.95, 200),  # 7 front
    (None, 10),  # 8 missing accuracy: incomparable
    (math.nan, 10),  # 9 NaN: incomparable
    (0.75, 70),  # 10 dominated by 2 (and 1): second layer below
]


def as_dicts(points):
    return [{"acc": a, "macs": m} for a, m in points]


def test_front_keeps_one_index_per_trade_off_and_skips_missing_values():
    assert pareto_front(as_dicts(POINTS)) == [0, 1, 7]


def test_ranks_peel_layers_and_share_ranks_between_duplicates():
    assert pareto_ranks(as_dicts(POINTS)) == [0, 0, 1, 0, 1, 0, 1, 0, -1, -1, 2]


def test_front_is_deterministic_under_reordering():
    shuffled = POINTS[::-1]
    front = [shuffled[i] for i in pareto_front(as_dicts(shuffled))]
    assert sorted(front, key=lambda p: p[1]) == [(0.85, 50), (0.90, 100), (0.95, 200)]
    # the kept duplicate is the one with the lowest index in the reversed list
    assert pareto_front(as_dicts(shuffled))[0] == len(POINTS) - 1 - 7


def test_three_objectives_and_empty_input():
    pts = [
        {"acc": 0.9, "macs": 10, "lat": 5.0},
        {"acc": 0.9, "macs": 10, "lat": 4.0},
        {"acc": 0.8, "macs": 5, "lat": 9.0},
    ]
    assert pareto_front(pts, maximize=("acc",), minimize=("macs", "lat")) == [1, 2]
    assert pareto_front([]) == []
    with pytest.raises(ValueError, match="at least one objective"):
        pareto_front(pts, maximize=(), minimize=())


def test_front_of_many_points_matches_a_simple_scan():
    # more points than one comparison chunk: (i*7919 mod 1009) scatters accuracies
    pts = [{"acc": (i * 7919 % 1009) / 1009, "macs": (i * 104729 % 2003)} for i in range(1300)]
    expected = [
        i for i, p in enumerate(pts) if not any(q["acc"] >= p["acc"] and q["macs"] <= p["macs"] and q != p for q in pts)
    ]
    expected = [i for i in expected if all(pts[j] != pts[i] for j in range(i))]
    assert pareto_front(pts) == expected


def test_hypervolume_by_hand():
    pts = [{"acc": 0.5, "macs": 10}, {"acc": 0.8, "macs": 20}, {"acc": 0.4, "macs": 25}, {"acc": 0.9, "macs": 30}]
    # staircase: (30-10)*0.5 + (30-20)*(0.8-0.5) = 13; the point at ref cost adds nothing
    assert hypervolume_2d(pts, ref_cost=30) == pytest.approx(13.0)
    assert hypervolume_2d(pts) == pytest.approx(13.0)  # default ref = largest cost
    assert hypervolume_2d(pts, ref_cost=40, ref_acc=0.1) == pytest.approx(30 * 0.4 + 20 * 0.3 + 10 * 0.1)
    assert hypervolume_2d([]) == 0.0


def row(trial, kind, macs, step=0, uri="runs:/r/subnet", method="uniform", kd=None, **metrics):
    r = {
        "trial_id": trial,
        "kind": kind,
        "step": step,
        "spec_hash": f"h{trial}{macs}",
        "method": method,
        "macs": macs,
        "params": macs // 100,
        "metrics": metrics,
        "artifact_uri": uri,
        "run_id": f"run-{trial}",
        "kd_weight": kd,
        "flops_target": None,
        "source": {},
    }
    if kind in ("final", "finetuned"):
        r["recipe_hash"] = {"final": "search", "finetuned": f"r{kd}"}[kind]
        r["recipe"] = f"{'e4' if kind == 'final' else 'e10'} cosine lr0.05 bs64 kd{kd:g}"
        r["init"] = "inherited" if method == "l1" else "scratch"
    return r


ROWS = [
    row("t1", "search", 10_000_000, val_top1=0.50),
    row("t1", "search", 20_000_000, val_top1=0.70),
    row("t2", "search", 20_000_000, val_top1=0.72),
    row("t2", "search", 40_000_000, val_top1=0.80),
    row("t5", "search", 8_000_000, method="l1", val_top1=0.18),  # right after the cut: never beside uniform's
    row("t1", "final", 30_000_000, kd=0.0, test_top1=0.999, robust_top1=0.99),  # search recipe: never ranked
    row("t3", "finetuned", 10_000_000, kd=0.0, test_top1=0.905, robust_top1=0.58),
    row("t1", "finetuned", 30_000_000, kd=0.0, test_top1=0.915, robust_top1=0.50),
    row("t2", "finetuned", 50_000_000, kd=0.0, test_top1=0.92, robust_top1=0.62),
    row("t4", "finetuned", 5_000_000, kd=0.0, uri=None, test_top1=0.99, robust_top1=0.99),  # no weights: never picked
    row("t6", "finetuned", 20_000_000, kd=0.9, method="l1", test_top1=0.925, robust_top1=0.66),
    row("ref", "unpruned", 100_000_000, test_top1=0.93),
]


def ids(rows):
    return [r["trial_id"] for r in rows]


def test_fronts_are_per_method_for_search_and_per_recipe_for_final():
    fronts = compute_fronts(ROWS)
    assert list(fronts) == ["search/l1", "search/uniform", "final/kd0", "robust/kd0", "final/kd0.9", "robust/kd0.9"]
    assert [(r["trial_id"], r["macs"]) for r in fronts["search/uniform"]] == [
        ("t1", 10_000_000),
        ("t2", 20_000_000),
        ("t2", 40_000_000),
    ]
    assert ids(fronts["search/l1"]) == ["t5"]
    assert ids(fronts["final/kd0"]) == ["t4"] and ids(fronts["robust/kd0"]) == ["t4"]  # t4 dominates
    assert ids(fronts["final/kd0.9"]) == ["t6"]
    for name, members in fronts.items():  # every member of a final front has the same recipe tag
        if not name.startswith("search"):
            assert len({m["recipe"] for m in members}) == 1 and all(m["kind"] == "finetuned" for m in members)
    without_t4 = compute_fronts([r for r in ROWS if r["trial_id"] != "t4"])
    assert ids(without_t4["final/kd0"]) == ["t3", "t1", "t2"]
    assert ids(without_t4["robust/kd0"]) == ["t3", "t2"]  # t1 (0.50) is beaten by t3 (0.58)
    assert list(compute_fronts(ROWS, init="inherited")) == [
        "search/l1",
        "search/uniform",
        "final/kd0.9",
        "robust/kd0.9",
    ]


def test_without_end_of_sweep_finetunes_the_trials_finals_are_the_pool():
    rows = [r for r in ROWS if r["kind"] != "finetuned"]
    assert ids(compute_fronts(rows)["final/kd0"]) == ["t1"] and finalized_pool(rows)[0]["kind"] == "final"


@pytest.mark.parametrize(
    "kwargs, trial",
    [
        (dict(mode="efficient"), "t6"),  # default group: the largest KD weight; 0.925 >= 0.93 - 0.01
        (dict(mode="efficient", kd_weight=0.0), "t2"),  # >= 0.92 of the baseline's 0.93: only t2
        (dict(mode="efficient", kd_weight=0.0, max_drop=0.02), "t1"),  # >= 0.91: t1 is cheaper than t2
        (dict(mode="efficient", kd_weight=0.0, max_drop=0.03), "t3"),  # >= 0.90: the cheapest with weights
        (dict(mode="efficient", kd_weight=0.0, max_drop=None), "t3"),
        (dict(mode="robust", kd_weight=0.0, max_drop=0.03), "t2"),  # robust 0.62
        (dict(mode="robust", kd_weight=0.0, max_drop=0.03, max_macs=40e6), "t3"),
        (dict(mode="efficient", kd_weight=0.0, min_acc=0.91, max_drop=0.05), "t1"),
        (dict(mode="efficient", init="scratch"), "t2"),  # l1's kd 0.9 group is gone: kd 0, within 0.01
    ],
)
def test_choose_operating_point(kwargs, trial):
    chosen, why = choose_operating_point(ROWS, **kwargs)
    assert chosen["trial_id"] == trial
    assert "candidates" in why and "fine-tuned with recipe" in why


def test_max_drop_is_measured_against_the_unpruned_baseline():
    _, why = choose_operating_point(ROWS, "efficient", kd_weight=0.0, max_drop=0.02)
    assert "test_top1 >= 0.9300 - 0.02 (the unpruned baseline's test_top1 minus --max-drop)" in why
    no_baseline = [r for r in ROWS if r["kind"] != "unpruned"]
    chosen, why = choose_operating_point(no_baseline, "efficient", kd_weight=0.0, max_drop=0.01)
    assert chosen["trial_id"] == "t1" and "the best candidate's test_top1 (no baseline)" in why


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(mode="efficient", max_macs=1e6),
            "--max-macs 1,000,000 is impossible: the cheapest fine-tuned subnet has 20,000,000 MACs",
        ),
        (
            dict(mode="robust", min_acc=0.95),
            "--min-acc 0.95 is impossible: the best test_top1 among the candidates is 0.9250",
        ),
        (
            dict(mode="robust", kd_weight=0.0, max_drop=0.01, max_macs=40e6),
            "--max-drop 0.01 is impossible: the unpruned baseline's test_top1 is 0.9300 and the best candidate reaches "
            "0.9150 (a drop of 0.0150); raise --max-drop",
        ),
        (
            dict(mode="robust", kd_weight=0.5),
            "--kd-weight 0.5: no fine-tuned subnet was trained with that KD weight; the sweep has 0, 0.9",
        ),
        (dict(mode="fastest"), "unknown mode 'fastest'"),
    ],
)
def test_choose_operating_point_errors_name_the_problem(kwargs, message):
    with pytest.raises(TrackingError) as e:
        choose_operating_point(ROWS, **kwargs)
    assert str(e.value).startswith(message)


def test_choose_without_finetuned_records_says_no_front_yet():
    with pytest.raises(TrackingError, match="no fine-tuned subnet with saved weights"):
        choose_operating_point([r for r in ROWS if r["kind"] == "search"], "efficient")


def test_format_table_shows_the_baseline_macs_percent_and_drop():
    text = format_table([ROWS[0], ROWS[7]], baseline=ROWS[-1])
    lines = text.splitlines()
    assert lines[0].split() == [
        "trial",
        "kind",
        "method",
        "target",
        "kd",
        "init",
        "MACs(M)",
        "MACs%",
        "params(K)",
        "val_top1",
        "test_top1",
        "drop",
        "robust_top1",
        "latency_ms_b1_p50",
    ]
    assert lines[1].split() == [
        "ref",
        "unpruned",
        "uniform",
        "-",
        "-",
        "-",
        "100.000",
        "100.0",
        "1000.0",
        "-",
        "0.9300",
        "-",
        "-",
        "-",
    ]
    assert lines[2].split() == [
        "t1",
        "search",
        "uniform",
        "-",
        "-",
        "-",
        "10.000",
        "10.0",
        "100.0",
        "0.5000",
        "-",
        "-",
        "-",
        "-",
    ]
    assert lines[3].split()[3:13] == [
        "-",
        "0",
        "scratch",
        "30.000",
        "30.0",
        "300.0",
        "-",
        "0.9150",
        "+0.0150",
        "0.5000",
    ]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns


@pytest.mark.slow  # a fresh interpreter
def test_pareto_module_needs_only_numpy():
    code = (
        "import sys, rayprune.tracking.pareto\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'torch', 'pyarrow', 'ray', 'optuna'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tracking_modules_import_each_other_without_cycles():
    """Within rayprune.tracking, imports go one way (the commands on top, pareto and store below)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "rayprune" / "tracking"
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.level == 1
            and node.module
            and (package / f"{node.module}.py").is_file()
        }

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert {"lookup", "mlflow_tracker", "plots", "model_registry", "pareto", "commands"} <= set(graph)
    assert [m for m in graph if reaches(m, m)] == []
