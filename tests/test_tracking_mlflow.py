"""SweepTracker end to end without Ray, resume idempotency, and `rayprune front` / `rayprune pick`.

One SQLite database for the whole module (creating one costs seconds of migrations). The sweep:

* subnets are the tiny CIFAR ResNet with ``s2.b0.mid`` at width A=8 < B=16 < C=24 < D=32 (MACs grow);
* the unpruned baseline: test .90, robust .70;
* t1 (cell uniform f0.5 kd0) searches A (val .50), B (.70) then C (.65), finalizes B (test .85,
  robust .50, search recipe);
* t2 (cell f0.7 kd0) searches B (.72), D (.80), finalizes D (test .88, robust .62);
* t3 searches C (.60) and fails; uniform's search front = t1/A, t2/B, t2/D;
* end of sweep, one recipe (e3 kd0): cell f0.5's choice A is fine-tuned (test .80, robust .58),
  cell f0.7's D (test .88, robust .62): the final and robust fronts rank only these two.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.entities import ViewType

from rayprune import models
from rayprune.cli import main as cli_main
from rayprune.methods.base import SubnetRecord
from rayprune.runner import save_subnet
from rayprune.tracking import TrackingError
from rayprune.tracking.mlflow_tracker import SweepTracker


def front_main(argv):
    return cli_main(["front", *argv])


def pick_main(argv):
    return cli_main(["pick", *argv])


TINY = models.full_spec("cifar_resnet:tiny")
WIDTH = {"A": 8, "B": 16, "C": 24, "D": 32}
EXPERIMENT = "tiny-sweep"
URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
CONFIG = {"seed": 3, "method": "uniform", "cells": {"flops_target": [0.5, 0.7]}, "data_dir": "/data"}


def spec(name):
    return models.with_widths(TINY, {"s2.b0.mid": WIDTH[name]})


def record(name, step=0, **metrics):
    return SubnetRecord.of(spec(name), metrics, "uniform", step).to_dict()


CLASS_NAMES = [f"c{i}" for i in range(10)]
RECIPE = {"epochs": 3, "schedule": "cosine", "lr": 0.1, "batch_size": 64, "kd_weight": 0.0}


def tuned(name, step=0, **metrics):
    """A record fine-tuned with the end-of-sweep recipe (what finetune_subnet writes in source)."""
    rec = record(name, step, **metrics)
    rec["source"] = {
        "finetuned": True,
        "init": "scratch",
        "recipe": RECIPE,
        "recipe_tag": "e3 cosine lr0.1 bs64 kd0",
        "recipe_hash": "abc123abc123",
        "robust_suite": 2,
        "preprocessing": {
            "input_size": 32,
            "channels": 3,
            "layout": "NCHW",
            "channel_order": "RGB",
            "scale": "pixel / 255",
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "class_names": CLASS_NAMES,
        },
    }
    return rec


def saved(tmp, tag, name, rec, seed):
    torch.manual_seed(seed)
    return save_subnet(tmp / "saved" / tag, spec(name), models.build(spec(name)).state_dict(), rec)


def run_sweep(tracker, tmp):
    tracker.start_sweep("sweep-a", CONFIG, {"base_model": "cifar_resnet:tiny"})
    tracker.log_unpruned(
        SubnetRecord.of(TINY, {"test_top1": 0.9, "robust_top1": 0.7, "latency_ms_b1_p50": 2.0}, "unpruned", 0).to_dict()
    )
    tracker.trial_started(
        "t1",
        {"method": "uniform", "flops_target": 0.5, "kd_weight": 0.0, "hparams": {"lr": 0.1}},
        run_name="uniform_f0.5_kd0_t1",
    )
    tracker.log_step("t1", 0, {"loss": 1.5}, [record("A", val_top1=0.50), record("B", val_top1=0.70)])
    tracker.log_step("t1", 1, {"loss": 1.2}, [record("C", 1, val_top1=0.65)])
    final_b = record("B", 1, val_top1=0.70, test_top1=0.85, robust_top1=0.50)
    tracker.trial_finished("t1", final_b, saved(tmp, "t1", "B", final_b, 1), refresh_front=False)
    tracker.trial_started("t2", {"method": "uniform", "flops_target": 0.7, "kd_weight": 0.0})
    tracker.log_step("t2", 0, {"loss": 1.1}, [record("B", val_top1=0.72), record("D", val_top1=0.80)])
    final_d = record("D", 0, val_top1=0.80, test_top1=0.88, robust_top1=0.62)
    tracker.trial_finished("t2", final_d, saved(tmp, "t2", "D", final_d, 2), refresh_front=False)
    tracker.log_step("t3", 0, {"loss": 3.0}, [record("C", val_top1=0.60)])  # never "started": auto-created
    tracker.trial_finished("t3", status="FAILED", refresh_front=False)
    tuned_a = tuned("A", 0, val_top1=0.50, test_top1=0.80, robust_top1=0.58, latency_ms_b1_p50=1.0)
    tracker.log_finetuned(
        tuned_a,
        saved(tmp, "ft-a", "A", tuned_a, 3),
        trial_id="t1",
        cell="uniform_f0.5_kd0",
        flops_target=0.5,
        kd_weight=0.0,
    )
    tuned_d = tuned("D", 0, val_top1=0.80, test_top1=0.88, robust_top1=0.62, latency_ms_b1_p50=1.5)
    tracker.log_finetuned(
        tuned_d,
        saved(tmp, "ft-d", "D", tuned_d, 4),
        trial_id="t2",
        cell="uniform_f0.7_kd0",
        flops_target=0.7,
        kd_weight=0.0,
    )
    fronts = tracker.update_front()
    tracker.finish()
    return fronts


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = SweepTracker(uri, EXPERIMENT, tmp / "work")
    members = run_sweep(tracker, tmp)
    return {"tmp": tmp, "uri": uri, "tracker": tracker, "client": tracker.client, "members": members}


def runs_of(client, experiment_id, role):
    return client.search_runs([experiment_id], f"tags.`rayprune.role` = '{role}'", ViewType.ALL)


def artifact(client, run_id, path, tmp):
    return client.download_artifacts(run_id, path, str(tmp))


def test_fronts_rank_only_like_with_like(sweep):
    fronts = sweep["members"]
    assert list(fronts) == ["search/uniform", "final/kd0", "robust/kd0"]
    h = {k: models.spec_hash(spec(k)) for k in WIDTH}
    assert [(m["trial_id"], m["kind"], m["spec_hash"]) for m in fronts["search/uniform"]] == [
        ("t1", "search", h["A"]),
        ("t2", "search", h["B"]),
        ("t2", "search", h["D"]),
    ]
    # only the end-of-sweep fine-tunes, all with one recipe tag: the trials' finals (search recipe) never rank
    for name in ("final/kd0", "robust/kd0"):
        assert [(m["trial_id"], m["kind"], m["spec_hash"]) for m in fronts[name]] == [
            ("t1", "finetuned", h["A"]),
            ("t2", "finetuned", h["D"]),
        ]
        assert {m["recipe"] for m in fronts[name]} == {"e3 cosine lr0.1 bs64 kd0"}


def test_parent_run_has_config_params_versions_and_front_artifacts(sweep, tmp_path):
    client, tracker = sweep["client"], sweep["tracker"]
    (parent,) = runs_of(client, tracker.experiment_id, "sweep")
    assert parent.info.run_id == tracker.parent_run_id and parent.info.status == "FINISHED"
    # a model-development experiment, not one the MLflow 3 UI opens in GenAI mode
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params["seed"] == "3" and parent.data.params["data_dir"] == "/data"
    assert parent.data.tags["rayprune.sweep_id"] == "sweep-a" and parent.data.tags["base_model"] == "cifar_resnet:tiny"
    assert parent.data.tags["version.torch"] == metadata.version("torch")
    assert parent.data.tags["version.mlflow"] == metadata.version("mlflow")
    assert re.fullmatch(r"[0-9a-f]{40}", parent.data.tags.get("git_sha", "0" * 40))
    resolved = json.loads(Path(artifact(client, parent.info.run_id, "sweep/resolved_sweep.json", tmp_path)).read_text())
    assert resolved == CONFIG
    assert parent.data.metrics["front_size/search/uniform"] == 3 and parent.data.metrics["front_size/final/kd0"] == 2
    assert parent.data.metrics["front_size/robust/kd0"] == 2 and parent.data.metrics["unpruned_test_top1"] == 0.9
    assert parent.data.metrics["cells/uniform_f0.5_kd0/distinct_subnets"] == 1
    png = Path(artifact(client, parent.info.run_id, "pareto/pareto.png", tmp_path)).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    final = json.loads(Path(artifact(client, parent.info.run_id, "pareto/front_final_kd0.json", tmp_path)).read_text())
    keys = [dict(zip(final["columns"], row, strict=True))["key"] for row in final["data"]]
    assert keys == [f"t1/finetuned/0/{models.spec_hash(spec('A'))}", f"t2/finetuned/0/{models.spec_hash(spec('D'))}"]
    tables = {e["path"] for e in json.loads(parent.data.tags["mlflow.loggedArtifacts"])}
    assert tables == {"pareto/front_search_uniform.json", "pareto/front_final_kd0.json", "pareto/front_robust_kd0.json"}


def test_child_runs_record_every_subnet_once_and_front_tags(sweep, tmp_path):
    client, tracker = sweep["client"], sweep["tracker"]
    trials = {r.data.tags["rayprune.trial_id"]: r for r in runs_of(client, tracker.experiment_id, "trial")}
    assert sorted(trials) == ["t1", "t2", "t3"]
    assert [trials[t].info.run_name for t in ("t1", "t2", "t3")] == ["uniform_f0.5_kd0_t1", "t2", "t3"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials.values()} == {tracker.parent_run_id}
    assert [trials[t].info.status for t in ("t1", "t2", "t3")] == ["FINISHED", "FINISHED", "FAILED"]
    assert trials["t1"].data.params["hparams.lr"] == "0.1"
    assert [m.value for m in client.get_metric_history(trials["t1"].info.run_id, "loss")] == [1.5, 1.2]
    assert trials["t2"].data.metrics["test_top1"] == 0.88
    assert trials["t2"].data.metrics["macs"] == models.macs(spec("D"))
    tags = {
        t: tuple(
            trials[t].data.tags[k]
            for k in ("rayprune.is_pareto", "rayprune.is_pareto_final", "rayprune.is_pareto_robust")
        )
        for t in trials
    }
    assert tags == {
        "t1": ("true", "false", "false"),
        "t2": ("true", "false", "false"),
        "t3": ("false", "false", "false"),
    }
    finetunes = {r.info.run_name: r for r in runs_of(client, tracker.experiment_id, "finetune")}
    assert sorted(finetunes) == ["finetune-uniform_f0.5_kd0", "finetune-uniform_f0.7_kd0"]
    a = finetunes["finetune-uniform_f0.5_kd0"]
    assert a.data.tags["rayprune.is_pareto_robust"] == "true" and a.data.tags["rayprune.is_pareto_final"] == "true"
    assert a.data.metrics["robust_top1"] == 0.58 and a.data.metrics["test_top1"] == 0.80
    assert a.data.metrics["macs"] == models.macs(spec("A")) and a.data.metrics["latency_ms"] == 1.0
    assert a.data.metrics["macs_pct"] == pytest.approx(100 * models.macs(spec("A")) / models.macs(TINY))
    assert a.data.params["recipe"] == "e3 cosine lr0.1 bs64 kd0" and a.data.params["init"] == "scratch"
    table = json.loads(Path(artifact(client, trials["t1"].info.run_id, "subnets.json", tmp_path)).read_text())
    assert len(table["data"]) == 4  # A, B, C searched + B final
    saved_files = sorted(f.path for f in client.list_artifacts(trials["t1"].info.run_id, "subnet"))
    assert saved_files == ["subnet/metrics.json", "subnet/spec.json", "subnet/weights.pt"]


def test_parquet_rows_are_exactly_the_recorded_subnets(sweep):
    tracker = sweep["tracker"]
    table = pq.read_table(tracker.workdir / "subnets.parquet").to_pydict()
    rows = sorted(zip(table["trial_id"], table["kind"], table["step"], table["spec_hash"], strict=True))
    h = {k: models.spec_hash(spec(k)) for k in WIDTH}
    assert rows == sorted(
        [
            ("unpruned", "unpruned", 0, models.spec_hash(TINY)),
            ("t1", "search", 0, h["A"]),
            ("t1", "search", 0, h["B"]),
            ("t1", "search", 1, h["C"]),
            ("t1", "final", 1, h["B"]),
            ("t2", "search", 0, h["B"]),
            ("t2", "search", 0, h["D"]),
            ("t2", "final", 0, h["D"]),
            ("t3", "search", 0, h["C"]),
            ("t1", "finetuned", 0, h["A"]),
            ("t2", "finetuned", 0, h["D"]),
        ]
    )
    by_kind = {
        (t, k): (f, kd, r, i)
        for t, k, f, kd, r, i in zip(
            table["trial_id"],
            table["kind"],
            table["flops_target"],
            table["kd_weight"],
            table["recipe"],
            table["init"],
            strict=True,
        )
    }
    assert by_kind[("t1", "finetuned")] == (0.5, 0.0, "e3 cosine lr0.1 bs64 kd0", "scratch")
    assert by_kind[("t2", "final")][:2] == (0.7, 0.0) and by_kind[("t3", "search")][:2] == (None, None)
    assert table["robust_suite"][table["kind"].index("finetuned")] == 2


@pytest.mark.slow  # a second tracked sweep
def test_resume_reuses_runs_and_duplicates_nothing(sweep, tmp_path):
    client, first = sweep["client"], sweep["tracker"]
    before = len(client.search_runs([first.experiment_id], "", ViewType.ALL))
    # a restarted driver on another machine: same tracking store, empty work dir
    again = SweepTracker(sweep["uri"], EXPERIMENT, tmp_path / "elsewhere")
    assert again.start_sweep("sweep-a", CONFIG, {}) == first.parent_run_id
    assert len(again.store) == len(first.store)  # restored from the parent's subnets.parquet
    assert again.trial_started("t1", {"method": "uniform", "hparams": {"lr": 0.1}}) == first.runs.trial_runs["t1"]
    assert again.log_step("t1", 1, {"loss": 1.2}, [record("C", 1, val_top1=0.65)]) == 0
    final_b = record("B", 1, val_top1=0.70, test_top1=0.85, robust_top1=0.50)
    again.trial_finished("t1", final_b, sweep["tmp"] / "saved" / "t1", refresh_front=False)
    again.update_front()
    again.finish()
    t1 = first.runs.trial_runs["t1"]
    assert len(client.search_runs([first.experiment_id], "", ViewType.ALL)) == before
    assert [m.value for m in client.get_metric_history(t1, "loss")] == [1.5, 1.2]
    assert len(client.get_metric_history(t1, "test_top1")) == 1
    assert len(again.store) == len(first.store) == 11
    table = json.loads(Path(artifact(client, t1, "subnets.json", tmp_path)).read_text())
    assert len(table["data"]) == 4


def test_front_prints_the_tables(sweep, capsys):
    assert front_main(["--experiment", EXPERIMENT, "--mlflow-uri", sweep["uri"]]) == 0
    out = capsys.readouterr().out
    assert "sweep sweep-a" in out and "11 subnet records" in out
    assert "unpruned baseline (trained once with recipes.finetune): " in out and "test_top1 0.9000" in out
    assert "search front of uniform: val_top1 vs MACs over its search-time subnets" in out and "-- 3 of 6" in out
    assert (
        "final front [kd0]: test_top1 vs MACs over the subnets fine-tuned with recipe e3 cosine lr0.1 bs64 kd0 "
        "-- 2 of 2" in out
    )
    macs_pct = f"{100 * models.macs(spec('A')) / models.macs(TINY):.1f}"
    # trial, kind, method, target, kd, init, MACs(M), MACs%, params(K), val, test, drop, robust, latency
    assert re.search(
        rf"t1\s+finetuned\s+uniform\s+0.5\s+0\s+scratch\s+\S+\s+{re.escape(macs_pct)}\s+\S+\s+0.5000\s+"
        rf"0.8000\s+\+0.1000\s+0.5800\s+1.0000",
        out,
    )
    assert re.search(r"unpruned\s+unpruned\s+unpruned\s+-\s+-\s+-\s+\S+\s+100.0\s+\S+\s+-\s+0.9000\s+-\s+0.7000", out)
    assert sweep["tracker"].front_table() in out  # the driver prints the same tables
    assert front_main(["--experiment", EXPERIMENT, "--mlflow-uri", sweep["uri"], "--init", "inherited"]) == 0
    assert "final front" not in capsys.readouterr().out  # no fine-tuned subnet started from inherited weights


def load_export(out_dir):
    net = models.build(json.loads((out_dir / "spec.json").read_text()))
    net.load_state_dict(torch.load(out_dir / "weights.pt", weights_only=True))
    return net.eval()


@pytest.mark.parametrize(
    "argv, width, trial, seed",
    [
        (["--mode", "efficient", "--max-drop", "0.05"], "D", "t2", 4),  # >= 0.85: only D (0.88)
        (["--mode", "efficient", "--max-drop", "0.15"], "A", "t1", 3),  # >= 0.75: A (0.80) is the cheapest
        (["--mode", "robust", "--max-drop", "0.15"], "D", "t2", 4),  # D's robust 0.62 beats A's 0.58
        (["--mode", "robust", "--max-drop", "0.15", "--max-macs", "{macs_b}"], "A", "t1", 3),
    ],
)
@pytest.mark.slow
def test_pick_exports_registers_an_onnx_model_that_pyfunc_loads(
    sweep, tmp_path, capsys, monkeypatch, argv, width, trial, seed
):
    import mlflow

    for name in URI_ENV:
        monkeypatch.delenv(name, raising=False)
    uri_env = {k: os.environ.get(k) for k in URI_ENV}
    argv = [a.format(macs_b=models.macs(spec("B"))) for a in argv]
    out = tmp_path / "picked"
    code = pick_main(
        [
            "--experiment",
            EXPERIMENT,
            "--mlflow-uri",
            sweep["uri"],
            "--out",
            str(out),
            "--onnx-exporter",
            "torchscript",
            *argv,
        ]
    )
    assert code == 0, capsys.readouterr().err
    mode = argv[1]
    assert json.loads((out / "spec.json").read_text()) == spec(width)
    torch.manual_seed(seed)  # the weights the fine-tune saved
    expected = models.build(spec(width)).state_dict()
    net = load_export(out)
    assert all(torch.equal(net.state_dict()[k], expected[k]) for k in expected)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], want, atol=1e-4, rtol=1e-3)
    card = (out / "model_card.md").read_text()
    assert "* sweep_id: `sweep-a`" in card and "| method | uniform |" in card and "| kd weight | 0 |" in card
    assert "| test_top1 |" in card and "| 0.9000 |" in card and "* mean: `[0.5, 0.5, 0.5]`" in card
    name = f"rayprune-{EXPERIMENT}"
    version = sweep["client"].get_model_version_by_alias(name, mode)
    assert version.tags["rayprune.source_key"] == f"{trial}/finetuned/0/{models.spec_hash(spec(width))}"
    assert f"registered {name} version {version.version} as @{mode}" in capsys.readouterr().out
    # pick pointed MLflow's fluent API at the sweep's store only while it logged the model: the
    # process's URIs are as before (no MLFLOW_* variable left behind for later commands) ...
    assert {k: os.environ.get(k) for k in URI_ENV} == uri_env
    assert mlflow.get_tracking_uri() == f"sqlite:///{Path.cwd() / 'mlflow.db'}"  # the default, not pinned
    # ... and a real MLflow model: pyfunc loads the alias (ONNX flavor) and agrees with torch
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", sweep["uri"])
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@{mode}")
    got = loaded.predict(x.numpy())["logits"]
    assert np.abs(got - want).max() <= 1e-4
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 3, 32, 32)
    # the served model states what it expects: the signature's params and the model's metadata
    contract = {"input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "class_names": CLASS_NAMES}
    assert {p.name: p.default for p in loaded.metadata.signature.params} == contract
    assert loaded.metadata.metadata["rayprune_input"] == contract
    assert f"* classes (logit i is class i): `{CLASS_NAMES}`" in card


def test_pick_no_register_writes_nothing_to_the_store(sweep, tmp_path, capsys):
    client = sweep["client"]
    runs = len(client.search_runs([sweep["tracker"].experiment_id], "", ViewType.ALL))
    versions = len(client.search_model_versions())
    db = (sweep["tmp"] / "mlflow.db").read_bytes()
    out = tmp_path / "dry"
    assert (
        pick_main(
            [
                "--experiment",
                EXPERIMENT,
                "--mlflow-uri",
                sweep["uri"],
                "--out",
                str(out),
                "--mode",
                "efficient",
                "--max-drop",
                "0.15",
                "--no-register",
                "--onnx-exporter",
                "torchscript",
            ]
        )
        == 0
    )
    assert "not registered (--no-register)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model_card.md", "spec.json", "weights.pt"]
    assert len(client.search_runs([sweep["tracker"].experiment_id], "", ViewType.ALL)) == runs
    assert len(client.search_model_versions()) == versions
    assert (sweep["tmp"] / "mlflow.db").read_bytes() == db


def test_default_model_name_is_not_doubled():
    from rayprune.tracking.commands import default_model_name

    assert default_model_name("rayprune-quickstart") == "rayprune-quickstart"
    assert default_model_name("tiny-sweep") == "rayprune-tiny-sweep"


def test_pick_takes_the_saved_input_size_else_the_sweeps_else_refuses(tmp_path):
    """A subnet saved with its input size is exported at it; one saved before sizes were falls
    back to its sweep's input_size, else its dataset's (the record's preprocessing, else the
    registry's), and is refused when none is known: never the family default (32 here)."""
    from types import SimpleNamespace

    from rayprune.tracking.commands import _load_download

    def sweep(**params):
        return SimpleNamespace(data=SimpleNamespace(params=params))

    row = {"trial_id": "t1", "kind": "finetuned", "source": {"preprocessing": {"input_size": 16}}}
    weights = models.build(spec("A")).state_dict()
    sized = save_subnet(tmp_path / "sized", spec("A"), weights, record("A"), input_size=12)
    old = save_subnet(tmp_path / "old", spec("A"), weights, record("A"))
    assert _load_download(sized, row, sweep(input_size="8")).input_size == 12
    assert _load_download(old, row, sweep(input_size="8", **{"dataset.name": "cifar10"})).input_size == 8
    assert _load_download(old, row, sweep(input_size="null", **{"dataset.name": "cifar10"})).input_size == 16
    bare = {**row, "source": {}}
    assert _load_download(old, bare, sweep(input_size="null", **{"dataset.name": "digits"})).input_size == 8
    with pytest.raises(TrackingError, match=r"^the picked subnet \(trial t1, finetuned\) records no input size"):
        _load_download(old, bare, sweep(input_size="null"))


def error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rayprune: error: ")
    return err


def test_bad_input_fails_with_one_line(sweep, tmp_path, capsys):
    base = ["--mlflow-uri", sweep["uri"]]
    assert front_main(["--experiment", "nope", *base]) == 2
    err = error_line(capsys)
    assert "experiment 'nope' does not exist" in err and EXPERIMENT in err  # the known ones are listed
    assert front_main(["--experiment", EXPERIMENT, *base, "--sweep-id", "nosuch"]) == 2
    assert f"experiment '{EXPERIMENT}' has no parent run of sweep 'nosuch'" in error_line(capsys)
    assert (
        pick_main(
            ["--experiment", EXPERIMENT, *base, "--mode", "robust", "--max-macs", "1000", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "--max-macs 1,000 is impossible" in error_line(capsys)
    # the robust pick keeps to --max-drop of the baseline: A (0.80) is 0.10 below 0.90
    assert (
        pick_main(
            [
                "--experiment",
                EXPERIMENT,
                *base,
                "--mode",
                "robust",
                "--max-drop",
                "0.05",
                "--max-macs",
                str(models.macs(spec("B"))),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert (
        "--max-drop 0.05 is impossible: the unpruned baseline's test_top1 is 0.9000 and the best candidate "
        "reaches 0.8000"
    ) in error_line(capsys)
    assert (
        pick_main(
            ["--experiment", EXPERIMENT, *base, "--mode", "robust", "--kd-weight", "0.9", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "--kd-weight 0.9: no fine-tuned subnet was trained with that KD weight; the sweep has 0" in error_line(
        capsys
    )
    assert not (tmp_path / "x").exists()
    assert (
        pick_main(
            ["--experiment", EXPERIMENT, *base, "--mode", "efficient", "--min-acc", "92", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "expected a fraction in [0, 1]" in error_line(capsys)
    assert front_main(["--experiment", EXPERIMENT, "--mlflow-uri", f"sqlite:///{tmp_path / 'missing.db'}"]) == 2
    assert "no MLflow database at" in error_line(capsys)
    assert not (tmp_path / "missing.db").exists()


def test_unreachable_server_fails_fast_with_one_line(capsys):
    assert front_main(["--experiment", EXPERIMENT, "--mlflow-uri", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in error_line(capsys)
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server"):
        SweepTracker("http://127.0.0.1:9", EXPERIMENT)


@pytest.fixture
def not_mlflow_server():
    """A local HTTP server that answers every request with 503 (a proxy, a wrong port)."""

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_that_is_not_mlflow_fails_without_retrying(not_mlflow_server, capsys):
    # MLflow would retry a 503 with back-off for minutes; the first contact must not
    assert front_main(["--experiment", EXPERIMENT, "--mlflow-uri", not_mlflow_server]) == 2
    assert f"the tracking server at {not_mlflow_server} did not answer as an MLflow server" in error_line(capsys)


def test_a_cell_whose_budgets_do_not_bind_is_noted_once_through_say_not_stdout(sweep, tmp_path, capsys):
    notes = []
    tracker = SweepTracker(sweep["uri"], "budgets", tmp_path, say=notes.append)
    parent = tracker.start_sweep("sweep-c", {"seed": 0}, {})
    cell = {"method": "uniform", "flops_target": 0.5, "kd_weight": 0.0}
    for trial, reused in (("t1", None), ("t2", "t1")):
        tracker.trial_started(trial, cell)
        final = record("B", 0, val_top1=0.7, test_top1=0.85)
        final["source"] = {"reused_from": reused, "window": {"status": "below_window"}}
        tracker.trial_finished(trial, final, refresh_front=False)
    assert tracker.note_cell("uniform", 0.5, 0.0) and not tracker.note_cell("uniform", 0.5, 0.0)
    assert notes == [
        "rayprune: cell uniform_f0.5_kd0: its 2 trials all chose the same subnet under different Optuna budgets: "
        "the per-stage budgets do not bind there (1 trial(s) reused the cached training instead of repeating it); "
        "narrow optuna.stage_prune or lower samples_per_cell"
    ]
    assert tracker.cell_stats() == [
        {"cell": "uniform_f0.5_kd0", "trials": 2, "distinct": 1, "reused": 1, "outside_window": 2}
    ]
    tracker.finish()
    assert capsys.readouterr().out == ""  # the tracker itself never prints
    run = tracker.client.get_run(parent)
    assert run.data.tags["rayprune.budgets_do_not_bind.uniform_f0.5_kd0"] == "true"
    assert run.data.metrics["cells/uniform_f0.5_kd0/outside_window"] == 2


def test_sweep_without_finished_trials_has_no_front_yet(sweep, tmp_path, capsys):
    tracker = SweepTracker(sweep["uri"], "fresh", tmp_path)
    tracker.start_sweep("sweep-b", {"seed": 0}, {})
    tracker.log_step("t1", 0, {}, [record("A", val_top1=0.5)])
    assert front_main(["--experiment", "fresh", "--mlflow-uri", sweep["uri"]]) == 2
    assert "sweep 'sweep-b' has no Pareto front yet" in error_line(capsys)


def test_the_plot_draws_every_finalized_subnet_fronts_baseline_targets_and_picks(sweep):
    from rayprune.tracking.plots import default_picks, front_figure

    rows = sweep["tracker"].store.rows()
    rows = [dict(r, flops_target=r["flops_target"] or None) for r in rows]
    fig = front_figure(rows, sweep["members"])
    test_ax, robust_ax, search_ax = fig.axes[:3]

    def points(ax, gid):
        return sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == gid)

    for ax in (test_ax, robust_ax):  # 2 fine-tuned subnets, 2 trials' own finals (hollow), both picks
        assert points(ax, "finalized") == 2 and points(ax, "trial_finals") == 2
        assert [line.get_gid() for line in ax.lines].count("front") == 1
        assert [line.get_gid() for line in ax.lines].count("baseline") == 1
        assert {line.get_xdata()[0] for line in ax.lines if line.get_gid() == "target"} == {50.0, 70.0}
    # nothing is within 0.01 of the baseline's 0.90: the picks the sweep suggests (max-drop 0.02) are marked
    assert set(default_picks(rows)) == {"efficient pick (max-drop 0.02)", "robust pick (max-drop 0.02)"}
    assert points(test_ax, "pick") == 2
    assert points(search_ax, "search") == 6  # every search-time subnet (t1: 3, t2: 2, t3: 1)
    assert test_ax.get_xlabel() == "MACs (% of unpruned)" and test_ax.get_ylabel() == "test top-1"


def test_fail_marks_the_parent_run_failed(tmp_path):
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "failing", tmp_path / "work")
    with pytest.raises(RuntimeError, match="start_sweep"):
        tracker.fail()
    parent = tracker.start_sweep("sweep-f", CONFIG)
    tracker.fail()
    assert tracker.client.get_run(parent).info.status == "FAILED"
    assert tracker.start_sweep("sweep-f", CONFIG) == parent  # --resume reopens it
    assert tracker.client.get_run(parent).info.status == "RUNNING"


@pytest.mark.slow  # a fresh interpreter importing mlflow
def test_importing_tracking_changes_no_environment_and_connecting_quiets_mlflow(tmp_path, migrated_mlflow_store):
    # MLflow's import sets its own private telemetry session id (_MLFLOW_TELEMETRY_SESSION_ID, unless
    # CI is set): not an environment rayprune changes, so left out of the comparison.
    code = (
        "import os, sys\n"
        "def public():\n"
        "    return {k: v for k, v in os.environ.items() if not k.startswith('_MLFLOW_')}\n"
        "before = public()\n"
        "import rayprune.tracking.lookup, rayprune.tracking.mlflow_tracker, rayprune.tracking.commands\n"
        "assert public() == before\n"
        f"rayprune.tracking.lookup.connect({migrated_mlflow_store(tmp_path / 'mlflow.db')!r})\n"
        "print(os.environ['MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'],\n"
        "      os.environ['MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "_MLFLOW_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["false", "true"]
