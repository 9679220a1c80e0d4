"""SweepTracker end to end without Ray, resume idempotency, and `rayprune front` / `rayprune pick`.

One SQLite database for the whole module (creating one costs seconds of migrations). The sweep:

* subnets are the tiny CIFAR ResNet with ``s2.b0.mid`` at width A=8 < B=16 < C=24 < D=32 (MACs grow);
* t1 searches A (val .50), B (.70) then C (.65), finalizes B (test .85, robust .50);
* t2 searches B (.72), D (.80), finalizes D (test .88, robust .62);
* t3 searches C (.60) and fails; search front = t1/A, t2/B, t2/D;
* the front member t1/A is fine-tuned (test .80, robust .58): it joins the final front and
  knocks t1/B (robust .50) off the robust front.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from importlib import metadata

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.entities import ViewType

from rayprune import models
from rayprune.methods.base import SubnetRecord
from rayprune.runner import save_subnet
from rayprune.tracking import TrackingError
from rayprune.tracking.cli import front_main, pick_main
from rayprune.tracking.mlflow_tracker import SweepTracker

TINY = models.full_spec("cifar_resnet:tiny")
WIDTH = {"A": 8, "B": 16, "C": 24, "D": 32}
EXPERIMENT = "tiny-sweep"
CONFIG = {"seed": 3, "method": "uniform", "cells": {"flops_target": [0.5, 0.7]}, "data_dir": "/data"}


def spec(name):
    return models.with_widths(TINY, {"s2.b0.mid": WIDTH[name]})


def record(name, step=0, **metrics):
    return SubnetRecord.of(spec(name), metrics, "uniform", step).to_dict()


def saved(tmp, tag, name, rec, seed):
    torch.manual_seed(seed)
    return save_subnet(tmp / "saved" / tag, spec(name), models.build(spec(name)).state_dict(), rec)


def run_sweep(tracker, tmp):
    tracker.start_sweep("sweep-a", CONFIG, {"base_model": "cifar_resnet:tiny"})
    tracker.log_unpruned(SubnetRecord.of(TINY, {"test_top1": 0.9, "robust_top1": 0.7}, "unpruned", 0).to_dict())
    tracker.trial_started("t1", {"method": "uniform", "hparams": {"lr": 0.1}}, run_name="uniform_f0.5_kd0_t1")
    tracker.log_step("t1", 0, {"loss": 1.5}, [record("A", val_top1=0.50), record("B", val_top1=0.70)])
    tracker.log_step("t1", 1, {"loss": 1.2}, [record("C", 1, val_top1=0.65)])
    final_b = record("B", 1, test_top1=0.85, robust_top1=0.50)
    tracker.trial_finished("t1", final_b, saved(tmp, "t1", "B", final_b, 1))
    tracker.trial_started("t2", {"method": "uniform"})
    tracker.log_step("t2", 0, {"loss": 1.1}, [record("B", val_top1=0.72), record("D", val_top1=0.80)])
    final_d = record("D", 0, test_top1=0.88, robust_top1=0.62)
    tracker.trial_finished("t2", final_d, saved(tmp, "t2", "D", final_d, 2))
    tracker.log_step("t3", 0, {"loss": 3.0}, [record("C", val_top1=0.60)])  # never "started": auto-created
    tracker.trial_finished("t3", status="FAILED")
    members = tracker.update_front()
    member_a = next(m for m in members if m["trial_id"] == "t1")
    tuned_a = record("A", 0, test_top1=0.80, robust_top1=0.58)
    tracker.log_finetuned(member_a["key"], tuned_a, saved(tmp, "ft", "A", tuned_a, 3))
    tracker.finish()
    return members


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


def test_update_front_returns_search_front_members_with_finetune_status(sweep):
    got = [(m["trial_id"], m["spec_hash"], m["finetuned"]) for m in sweep["members"]]
    assert got == [("t1", models.spec_hash(spec("A")), False), ("t2", models.spec_hash(spec("B")), False),
                   ("t2", models.spec_hash(spec("D")), True)]  # t2 finalized D itself
    assert sweep["members"][0]["key"] == f"t1/search/0/{models.spec_hash(spec('A'))}"


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
    resolved = json.loads(open(artifact(client, parent.info.run_id, "sweep/resolved_sweep.json", tmp_path)).read())
    assert resolved == CONFIG
    assert parent.data.metrics["front_size_search"] == 3 and parent.data.metrics["front_size_final"] == 3
    assert parent.data.metrics["front_size_robust"] == 2 and parent.data.metrics["unpruned_test_top1"] == 0.9
    png = open(artifact(client, parent.info.run_id, "pareto/pareto.png", tmp_path), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    final = json.loads(open(artifact(client, parent.info.run_id, "pareto/front_final.json", tmp_path)).read())
    keys = [dict(zip(final["columns"], row))["key"] for row in final["data"]]
    assert keys == [f"t1/finetuned/0/{models.spec_hash(spec('A'))}", f"t1/final/1/{models.spec_hash(spec('B'))}",
                    f"t2/final/0/{models.spec_hash(spec('D'))}"]
    tables = {e["path"] for e in json.loads(parent.data.tags["mlflow.loggedArtifacts"])}
    assert tables == {"pareto/front_search.json", "pareto/front_final.json", "pareto/front_robust.json"}


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
    tags = {t: tuple(trials[t].data.tags[k] for k in ("rayprune.is_pareto", "rayprune.is_pareto_final",
                                                    "rayprune.is_pareto_robust")) for t in trials}
    assert tags == {"t1": ("true", "true", "false"), "t2": ("true", "true", "true"), "t3": ("false", "false", "false")}
    (tuned,) = runs_of(client, tracker.experiment_id, "finetune")
    assert tuned.data.tags["rayprune.is_pareto_robust"] == "true" and tuned.data.metrics["robust_top1"] == 0.58
    table = json.loads(open(artifact(client, trials["t1"].info.run_id, "subnets.json", tmp_path)).read())
    assert len(table["data"]) == 4  # A, B, C searched + B final
    saved_files = sorted(f.path for f in client.list_artifacts(trials["t1"].info.run_id, "subnet"))
    assert saved_files == ["subnet/metrics.json", "subnet/spec.json", "subnet/weights.pt"]


def test_parquet_rows_are_exactly_the_recorded_subnets(sweep):
    tracker = sweep["tracker"]
    table = pq.read_table(tracker.workdir / "subnets.parquet").to_pydict()
    rows = sorted(zip(table["trial_id"], table["kind"], table["step"], table["spec_hash"]))
    h = {k: models.spec_hash(spec(k)) for k in WIDTH}
    assert rows == sorted([
        ("unpruned", "unpruned", 0, models.spec_hash(TINY)),
        ("t1", "search", 0, h["A"]), ("t1", "search", 0, h["B"]), ("t1", "search", 1, h["C"]),
        ("t1", "final", 1, h["B"]),
        ("t2", "search", 0, h["B"]), ("t2", "search", 0, h["D"]), ("t2", "final", 0, h["D"]),
        ("t3", "search", 0, h["C"]), ("t1", "finetuned", 0, h["A"])])


def test_resume_reuses_runs_and_duplicates_nothing(sweep, tmp_path):
    client, first = sweep["client"], sweep["tracker"]
    before = len(client.search_runs([first.experiment_id], "", ViewType.ALL))
    # a restarted driver on another machine: same tracking store, empty work dir
    again = SweepTracker(sweep["uri"], EXPERIMENT, tmp_path / "elsewhere")
    assert again.start_sweep("sweep-a", CONFIG, {}) == first.parent_run_id
    assert len(again.store) == len(first.store)  # restored from the parent's subnets.parquet
    assert again.trial_started("t1", {"method": "uniform", "hparams": {"lr": 0.1}}) == first._trial_runs["t1"]
    assert again.log_step("t1", 1, {"loss": 1.2}, [record("C", 1, val_top1=0.65)]) == 0
    final_b = record("B", 1, test_top1=0.85, robust_top1=0.50)
    again.trial_finished("t1", final_b, sweep["tmp"] / "saved" / "t1")
    again.update_front()
    again.finish()
    t1 = first._trial_runs["t1"]
    assert len(client.search_runs([first.experiment_id], "", ViewType.ALL)) == before
    assert [m.value for m in client.get_metric_history(t1, "loss")] == [1.5, 1.2]
    assert len(client.get_metric_history(t1, "test_top1")) == 1
    assert len(again.store) == len(first.store) == 10
    table = json.loads(open(artifact(client, t1, "subnets.json", tmp_path)).read())
    assert len(table["data"]) == 4


def test_front_prints_the_tables(sweep, capsys):
    assert front_main(["--experiment", EXPERIMENT, "--mlflow-uri", sweep["uri"]]) == 0
    out = capsys.readouterr().out
    assert "sweep sweep-a" in out and "10 subnet records" in out
    assert "search front: val_top1 vs MACs over every subnet evaluated -- 3 of 6" in out
    assert "robust front: robust_top1 vs MACs over finalized/fine-tuned subnets -- 2 of 3" in out
    macs_pct = f"{100 * models.macs(spec('A')) / models.macs(TINY):.1f}"
    assert re.search(rf"t1\s+finetuned\s+0\s+uniform\s+\S+\s+\S+\s+{re.escape(macs_pct)}\s+-\s+0.8000\s+0.5800", out)
    assert sweep["tracker"].front_table() in out  # the driver prints the same tables


def load_export(out_dir):
    net = models.build(json.loads((out_dir / "spec.json").read_text()))
    net.load_state_dict(torch.load(out_dir / "weights.pt", weights_only=True))
    return net.eval()


@pytest.mark.parametrize("argv, width, trial", [
    (["--mode", "efficient", "--max-drop", "0.05"], "B", "t1"),  # >= 0.83: B (0.85) is the cheapest
    (["--mode", "robust", "--max-macs", "{macs_b}"], "A", "t1"),  # A's robust 0.58 beats B's 0.50
])
def test_pick_exports_checks_onnx_and_sets_the_alias(sweep, tmp_path, capsys, argv, width, trial):
    argv = [a.format(macs_b=models.macs(spec("B"))) for a in argv]
    out = tmp_path / "picked"
    code = pick_main(["--experiment", EXPERIMENT, "--mlflow-uri", sweep["uri"], "--out", str(out),
                      "--onnx-exporter", "torchscript", *argv])
    assert code == 0, capsys.readouterr().err
    mode = argv[1]
    assert json.loads((out / "spec.json").read_text()) == spec(width)
    torch.manual_seed({"B": 1, "A": 3}[width])  # the weights the trial / fine-tune saved
    expected = models.build(spec(width)).state_dict()
    net = load_export(out)
    assert all(torch.equal(net.state_dict()[k], expected[k]) for k in expected)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], net(x).numpy(), atol=1e-4, rtol=1e-3)
    assert "* sweep_id: `sweep-a`" in (out / "model_card.md").read_text()
    version = sweep["client"].get_model_version_by_alias(f"rayprune-{EXPERIMENT}", mode)
    assert version.tags["rayprune.source_key"].startswith(f"{trial}/")
    assert version.tags["rayprune.source_key"].endswith(models.spec_hash(spec(width)))
    assert f"registered rayprune-{EXPERIMENT} version {version.version} as @{mode}" in capsys.readouterr().out


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
    assert pick_main(["--experiment", EXPERIMENT, *base, "--mode", "robust", "--max-macs", "1000",
                      "--out", str(tmp_path / "x")]) == 2
    assert "--max-macs 1,000 is impossible" in error_line(capsys)
    assert not (tmp_path / "x").exists()
    assert pick_main(["--experiment", EXPERIMENT, *base, "--mode", "efficient", "--min-acc", "92",
                      "--out", str(tmp_path / "x")]) == 2
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
        def do_GET(self):  # noqa: N802 - http.server naming
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


def test_sweep_without_finished_trials_has_no_front_yet(sweep, tmp_path, capsys):
    tracker = SweepTracker(sweep["uri"], "fresh", tmp_path)
    tracker.start_sweep("sweep-b", {"seed": 0}, {})
    tracker.log_step("t1", 0, {}, [record("A", val_top1=0.5)])
    assert front_main(["--experiment", "fresh", "--mlflow-uri", sweep["uri"]]) == 2
    assert "sweep 'sweep-b' has no Pareto front yet" in error_line(capsys)
