"""What a finished sweep must have recorded, read back from Tune's results, the subnet store and
MLflow, and the export a user runs next: shared by the sweep test modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from rayprune.methods.base import stage_rates
from rayprune.tracking.pareto import compute_fronts
from rayprune.tracking.store import SubnetStore


def trial_results(experiment_path: str | Path) -> dict[str, list[dict]]:
    """Each trial's reported results (Tune's result.json), on local storage or S3, by trial id."""
    import pyarrow.fs

    from rayprune.orchestration.storage import filesystem

    fs, root = filesystem(str(experiment_path))
    out = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        result_file = f"{info.path}/result.json"
        if info.type != pyarrow.fs.FileType.Directory or fs.get_file_info(result_file).type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_stream(result_file) as f:
            results = [json.loads(line) for line in f.readall().decode().splitlines() if line]
        if results:  # a trial a killed driver had started but Tune never saved may have written none
            out[results[0]["trial_id"]] = results
    return out


def reported(experiment_path: str | Path) -> tuple[set, dict]:
    """What the trials reported, from Tune's result.json files: the (trial, step, spec hash) of
    every search subnet, and each trial's final record."""
    from rayprune.models import spec_hash

    search, finals = set(), {}
    for results in trial_results(experiment_path).values():
        for result in results:
            for s in json.loads(result.get("subnets") or "[]"):
                search.add((result["trial_id"], result["step"], spec_hash(s["spec"])))
            if result.get("final"):
                finals[result["trial_id"]] = json.loads(result["final_record"])
    return search, finals


def undisturbed_trial(config: dict, workdir: Path) -> tuple[set, Any]:
    """What a trial of ``config`` reports when nothing disturbs it: its search subnets' (step,
    spec hash) and its final record, computed in this process by the parts the trainable runs
    (:class:`TrialSpec`, ``build_method``, ``drive``, ``final_phase``), on the trial's one thread."""
    import tempfile

    import torch

    from rayprune.models import spec_hash
    from rayprune.orchestration.final_phase import final_phase
    from rayprune.orchestration.storage import localize
    from rayprune.orchestration.trial_spec import TrialSpec
    from rayprune.runner import TrialState, build_method, drive

    spec = TrialSpec.from_config(config)
    cfg = spec.trial_config()
    if cfg.teacher is not None:
        cfg = cfg.model_copy(update={"teacher": localize(cfg.teacher, workdir / "teacher")})
    searched: set = set()

    def report(result, state, checkpoint_dir) -> None:
        searched.update((result.step, spec_hash(s.spec)) for s in result.subnets)

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.cpus_per_trial)))  # as the trainable does
    try:
        method = build_method(cfg, workdir / "work")
        drive(method, TrialState(), report, max_steps=cfg.max_steps, checkpoint_dir=tempfile.TemporaryDirectory)
        record, _ = final_phase(method, None, spec.cell, "undisturbed")
    finally:
        torch.set_num_threads(threads)
    return searched, record


def store_of(experiment_path: Path) -> SubnetStore:
    return SubnetStore(experiment_path / "rayprune" / "subnets.parquet")


def check_tracking(
    cfg, experiment_path: str | Path, cells: list[tuple[float, float]], rows: list | None = None
) -> None:
    """MLflow and Parquet hold exactly what the trials reported, once; ``cells``: the (FLOPs
    target, KD weight) of every trial; ``rows``: the subnet store's (default: the one in the
    local ``experiment_path``)."""
    rows = store_of(Path(experiment_path)).rows() if rows is None else rows
    search, finals = reported(experiment_path)
    assert {(r["trial_id"], r["step"], r["spec_hash"]) for r in rows if r["kind"] == "search"} == search
    final_rows = {r["trial_id"]: r for r in rows if r["kind"] == "final"}
    assert set(final_rows) == set(finals) and len(finals) == cfg.num_trials()
    for trial_id, record in finals.items():
        assert final_rows[trial_id]["metrics"] == record["metrics"] and final_rows[trial_id]["spec"] == record["spec"]
        window = record["source"]["window"]  # every reported subnet lands in [0.9, 1] x its target's MACs
        assert window["status"] == "in_window" and window["low"] <= record["macs"] <= window["high"]
    assert [r["kind"] for r in rows].count("unpruned") == 1

    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("rayprune.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    trials = [r for r in runs if r.data.tags.get("rayprune.role") == "trial"]
    assert len(trials) == cfg.num_trials()
    assert all(r.data.tags["mlflow.parentRunId"] == parent and r.info.status == "FINISHED" for r in trials)
    for r in trials:  # named like Tune's trials: <method>_f<target>_kd<weight>_<trial id>
        p, trial_id = r.data.params, r.data.tags["rayprune.trial_id"]
        assert r.info.run_name == f"{p['method']}_f{float(p['flops_target']):g}_kd{float(p['kd_weight']):g}_{trial_id}"
    assert (
        sorted((float(r.data.params["flops_target"]), float(r.data.params["kd_weight"])) for r in trials) == cells
    )  # every cell, exactly once
    for r in trials:  # the proposed allocation and the realised per-stage rates: params and parquet
        params, final = r.data.params, final_rows[r.data.tags["rayprune.trial_id"]]
        rates = final["source"]["stage_rates"]
        assert rates == stage_rates(cfg.full_spec(), final["spec"]) and len(rates) == len(cfg.optuna.stage_prune)
        assert [float(params[f"rate_stage{i}"]) for i in range(len(rates))] == rates
        allocation = final["source"].get("allocation")
        if cfg.budget_use()[params["method"]] == "allocation":
            assert [float(params[f"alloc_stage{i}"]) for i in range(len(rates))] == allocation
            assert sum(allocation) == pytest.approx(1.0)
        else:
            assert allocation is None and "alloc_stage0" not in params
    for run in trials:  # one metric point per reported step, even across a resume
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "steps_done")]
        assert sorted(steps) == list(range(len(steps))) and steps
    assert {"subnets.parquet", "pareto"} <= {a.path for a in client.list_artifacts(parent)}
    baseline = next(r for r in rows if r["kind"] == "unpruned")  # measured once: test, robust, latency
    assert {"test_top1", "robust_top1", "latency_ms_b1_p50"} <= set(baseline["metrics"])
    assert baseline["robust_suite"] == 2 and all(r["robust_suite"] == 2 for r in rows if r["kind"] != "search")
    assert parents[0].data.metrics["unpruned_test_top1"] == baseline["metrics"]["test_top1"]
    if cfg.finetune_front:  # every cell's chosen subnet was fine-tuned with recipes.finetune, once
        tuned = [r for r in rows if r["kind"] == "finetuned"]
        assert sorted((r["flops_target"], r["kd_weight"]) for r in tuned) == sorted(cells)
        for r in tuned:  # the chosen subnet: the best search-val accuracy among the cell's trial finals
            cell_finals = [
                f
                for f in final_rows.values()
                if (f["flops_target"], f["kd_weight"]) == (r["flops_target"], r["kd_weight"])
            ]
            assert r["spec_hash"] == max(cell_finals, key=lambda f: f["metrics"]["val_top1"])["spec_hash"]
            epochs = cfg.recipes.finetune["epochs"]
            assert r["recipe"] == f"e{epochs} cosine lr0.1 bs64 kd{r['kd_weight']:g}" and r["init"] == "scratch"
        fronts = compute_fronts(rows)
        for name, members in fronts.items():
            if not name.startswith("search"):  # equally treated: one recipe tag per front, fine-tunes only
                assert len({m["recipe"] for m in members}) == 1 and {m["kind"] for m in members} == {"finetuned"}
        finetunes = [r for r in runs if r.data.tags.get("rayprune.role") == "finetune"]
        assert len(finetunes) == len(cells)
        assert all(
            {"macs", "macs_pct", "test_top1", "test_top1_drop", "robust_top1", "latency_ms"} <= set(r.data.metrics)
            for r in finetunes
        )
        # latency: the baseline and every candidate timed by one task on one node, in the store and the runs
        assert len({json.dumps(r["source"]["latency"], sort_keys=True) for r in [*tuned, baseline]}) == 1
        by_key = {r["run_id"]: r for r in tuned}
        for run in finetunes:
            row = by_key[run.info.run_id]
            assert run.data.metrics["latency_ms"] == row["metrics"]["latency_ms_b1_p50"]
            assert run.data.metrics["latency_ms_b64_spread"] == row["metrics"]["latency_ms_b64_spread"]
            assert run.data.params["latency.node"] == row["source"]["latency"]["node"]
        assert parents[0].data.metrics["unpruned_latency_ms_b1_p50"] == baseline["metrics"]["latency_ms_b1_p50"]


#: What ``rayprune pick --out`` writes.
EXPORTED_FILES = ["model.onnx", "model_card.md", "spec.json", "weights.pt"]


def pick_efficient(experiment: str, uri: str, out: Path) -> list[str]:
    """``rayprune pick --mode efficient --max-drop 1`` of a sweep's experiment into ``out`` (ONNX
    through the TorchScript exporter); the names of the files it wrote."""
    from rayprune.cli import main as cli_main

    pick = ["pick", "--experiment", experiment, "--mlflow-uri", uri, "--mode", "efficient", "--max-drop", "1"]
    assert cli_main([*pick, "--out", str(out), "--onnx-exporter", "torchscript"]) == 0
    return sorted(p.name for p in out.iterdir())
