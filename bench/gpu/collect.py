"""Merge the results the device commands returned into ``bench/results/<date>_<gpu>.jsonl`` and
print the results table (markdown).

    .venv/bin/python bench/gpu/collect.py /work/.device/<call1>/results.jsonl /work/.device/<call2>/results.jsonl ...
    # -> bench/results/2026-11-28_nvidia-h200.jsonl (+ .md), then: git add bench/results && git commit

Rows keep their order; a row already in the file (same stage, time and content) is not added again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu.common import REPO, read_rows


def _f(v: Any, fmt: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return format(v, fmt)
    return str(v)


def summary(rows: list[dict[str, Any]]) -> str:
    """The rows as markdown tables: stage A arms and ratios, stage B arms, stage C latency."""
    out = []
    pre = [r for r in rows if r["stage"] == "preflight"]
    if pre:
        bad = [f"{r['check']}: {r.get('error')}" for r in pre if not r.get("ok")]
        out.append(f"preflight: {len(pre) - len(bad)}/{len(pre)} OK" + ("".join(f"\n  FAIL {b}" for b in bad)))
    a_arms = [r for r in rows if r["stage"] == "A" and r.get("kind") == "arm"]
    if a_arms:
        out.append(
            "\n| stage A phase | arm | img/s | step ms | epoch s | TFLOP/s | compile s | rounds |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        for r in a_arms:
            if r.get("error"):
                out.append(f"| {r.get('phase')} | {r['arm']} | error: {r['error'][:80]} | | | | | |")
                continue
            out.append(
                f"| {r.get('phase')} | {r['arm']} | {_f(r['img_s'], '.0f')} | {_f(r['step_ms'], '.2f')} | "
                f"{_f(r['epoch_s'], '.2f')} | {_f(r['tflops'], '.2f')} | {_f(r.get('compile_s'), '.0f')} | "
                f"{r['rounds']} |"
            )
    a_ratios = [r for r in rows if r["stage"] == "A" and r.get("kind") == "ratio"]
    if a_ratios:
        out.append("\n| stage A phase | ratio (img/s) | median | min | max | rounds |\n|---|---|---|---|---|---|")
        for r in a_ratios:
            out.append(
                f"| {r.get('phase')} | {r['ratio']} | {_f(r['median_ratio'], '.2f')}x | "
                f"{_f(r['min_ratio'], '.2f')} | {_f(r['max_ratio'], '.2f')} | {r['rounds']} |"
            )
    for r in rows:
        if r["stage"] in ("calibrate",):
            out.append(
                f"\ncalibration: {r.get('model')} {_f(r.get('epoch_s'), '.2f')} s/epoch "
                f"({_f(r.get('img_s'), '.0f')} img/s, batch {r.get('batch_size')})"
            )
        if r["stage"] == "B" and r.get("kind") in ("plan", "replan"):
            out.append(
                f"stage B {r['kind']}: size {r.get('size')} {r.get('sizes')} at {_f(r.get('epoch_s'), '.2f')} "
                f"s/epoch ({r.get('epoch_source')}), budget left {_f(r.get('budget_left_s'), '.0f')} s"
            )
    b = [r for r in rows if r["stage"] == "B" and r.get("kind") in ("arm", "skipped")]
    if b:
        out.append(
            "\n| stage B arm | method | test top-1 | robust top-1 | MACs % | steps | wall s | fine-tune | note |\n"
            "|---|---|---|---|---|---|---|---|---|"
        )
        for r in b:
            note = (
                r.get("error")
                or (r.get("reason") if r.get("kind") == "skipped" else "")
                or ("truncated" if r.get("truncated") else "")
            )
            tag = r.get("recipe_tag") or (f"e{r.get('epochs')}" if r.get("arm") == "teacher" else "")
            out.append(
                f"| {r.get('arm')} | {r.get('method')} | {_f(r.get('test_top1'), '.4f')} | "
                f"{_f(r.get('robust_top1'), '.4f')} | {_f(r.get('macs_pct'), '.1f')} | {_f(r.get('steps_run'))} | "
                f"{_f(r.get('wall_s'), '.0f')} | {tag} | {str(note)[:120]} |"
            )
    out += _packing_lines(rows)
    out += _latency_lines(rows)
    for r in rows:
        if r["stage"] == "C" and r.get("kind") == "drift":
            out.append(
                f"stage C {r.get('group')}: reference re-timed at the end = "
                + ", ".join(f"{k} {_f(v, '.2f')}x" for k, v in r.items() if k.startswith("drift_b"))
            )
    errors = [r for r in rows if r.get("kind") == "error"]
    for r in errors:
        out.append(f"ERROR in stage {r['stage']}: {r.get('error')}")
    return "\n".join(out)


def _packing_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["stage"] == "A" and r.get("kind") == "break_even":
            out.append(
                f"\ncapture break-even at batch {r.get('batch_size')}: {_f(r.get('break_even_steps'), '.0f')} steps "
                f"(capture {_f(r.get('capture_s'), '.2f')} s; step {_f(r.get('eager_step_ms'), '.2f')} ms eager, "
                f"{_f(r.get('captured_step_ms'), '.2f')} ms captured)"
            )
    packed = [r for r in rows if r["stage"] == "packing" and r.get("kind") == "packing"]
    if packed:
        out.append(
            "\n| processes | aggregate img/s | x one process | reserved MiB / process | resources.gpu |\n"
            "|---|---|---|---|---|"
        )
        for r in packed:
            out.append(
                f"| {r['processes']} | {_f(r.get('aggregate_img_s'), '.0f')} | {_f(r.get('speedup_vs_1'), '.2f')} | "
                f"{_f(r.get('max_reserved_mib_per_process'), '.0f')} | {r.get('resources_gpu')} |"
            )
    return out


def _latency_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Stage C: per net, each timing's median ms and speed-up (and the realised fraction of the MACs speed-up)."""
    c = [r for r in rows if r["stage"] == "C" and r.get("kind") in ("net", "reference")]
    if not c:
        return []
    tags = [k.removeprefix("latency_ms_").removesuffix("_p50") for k in c[0] if k.startswith("latency_ms_b")]
    tags = [t for t in tags if not t.endswith("_p90")]
    tags += [f"ort_{k.removeprefix('ort_ms_').removesuffix('_p50')}" for k in c[0] if k.startswith("ort_ms_t")]
    tags = [t for t in tags if not t.endswith("_p90")]
    head = "| stage C net | MACs % | MACs speed-up | " + " | ".join(f"{t} ms (speed-up, realised)" for t in tags)
    out = ["\n" + head + " |\n|" + "---|" * (3 + len(tags))]
    for r in c:
        ref = r.get("kind") == "reference"
        cells = []
        for t in tags:
            ms = r.get(f"latency_ms_{t}_p50") if not t.startswith("ort_") else r.get(f"ort_ms_{t[4:]}_p50")
            speed, realised = r.get(f"speedup_{t}", 1.0), r.get(f"realised_{t}", 1.0)
            cells.append(f"{_f(ms, '.3f')} ({_f(speed, '.2f')}, {_f(realised, '.2f')})")
        out.append(
            f"| {r['net']}{' (reference)' if ref else ''} | {_f(r.get('macs_pct', 100.0), '.1f')} | "
            f"{_f(r.get('macs_speedup', 1.0), '.2f')} | " + " | ".join(cells) + " |"
        )
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="results.jsonl files returned by the device commands")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default=None, help="file stem (default <date>_<gpu>)")
    args = p.parse_args(argv)
    missing = [str(x) for x in args.inputs if not x.is_file()]
    if missing:
        print(f"collect: error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = read_rows(args.inputs)
    if not rows:
        print("collect: error: no rows in the inputs", file=sys.stderr)
        return 2
    gpu = next((r.get("meta_gpu") for r in rows if r.get("meta_gpu")), None) or "cpu"
    date = rows[0]["time"][:10]
    stem = args.name or f"{date}_{slug(gpu)}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{stem}.jsonl"
    have = set(path.read_text().splitlines()) if path.is_file() else set()
    new = [json.dumps(r, sort_keys=True) for r in rows]
    with path.open("a") as f:
        for line in new:
            if line not in have:
                f.write(line + "\n")
                have.add(line)
    table = summary(read_rows([path]))
    (args.out_dir / f"{stem}.md").write_text(f"# GPU kit results: {gpu}, {date}\n\n{table}\n")
    print(table)
    print(f"\ncollect: {path} ({len(have)} rows) and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
