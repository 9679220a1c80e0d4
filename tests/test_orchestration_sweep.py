"""End-to-end sweeps on a local Ray (2 CPUs, shared by the tests of this module): what a finished
sweep records (duplicates trained once, l1 allocations, the digits front and its pick served at
8x8), and the one-line refusals of the sweep command. Interrupted sweeps: test_sweep_interrupts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient
from sweep_checks import check_tracking, store_of

from rayprune import models
from rayprune.cli import sweep_main as main
from rayprune.orchestration.config import parse_sweep
from rayprune.orchestration.sweep import run_sweep
from rayprune.testing.sweeps import mini_sweep


def test_resume_without_a_sweep_to_resume_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(mini_sweep(tmp_path)))
    assert main(["--space", str(tmp_path / "mini.yaml"), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"rayprune: error: no sweep named mini-* to resume under "
        f"{tmp_path}/results; run without --resume to start one\n"
    )


def test_a_local_ray_without_gpus_refuses_gpu_trials(local_ray, tmp_path):
    from rayprune.orchestration.sweep import SweepError

    cfg = parse_sweep(mini_sweep(tmp_path, resources={"cpu": 1, "gpu": 0.5}))
    with pytest.raises(
        SweepError,
        match=r"^resources.gpu: each trial asks for 0.5 GPUs but this machine's Ray "
        r"has 0; lower resources.gpu or join a cluster with --address auto$",
    ):
        run_sweep(cfg)
    assert not (tmp_path / "results").exists()


def test_missing_cifar_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    from rayprune.engine import data

    def offline(name, root):
        raise OSError("offline")

    monkeypatch.setattr(data, "_download_cifar", offline)  # CI may have a network: never download here
    raw = mini_sweep(tmp_path, dataset={"name": "cifar10", "data_dir": str(tmp_path / "nodata")})
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--space", str(tmp_path / "mini.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"rayprune: error: cifar10 not found (looked in {tmp_path}/nodata/cifar-10-batches-py; "
            "download failed: OSError: offline)"
        )
        and err.count("\n") == 1
    )
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_bad_input_raised_in_a_ray_task_is_its_own_line(tmp_path, capsys, monkeypatch):
    from rayprune.engine.data import DataError
    from rayprune.orchestration import sweep

    def teacher_task_fails(*args, **kwargs):
        raise ray.exceptions.RayTaskError(
            "_train_teacher_task", "Traceback ...\n  File ...", DataError("imagenet not found (looked in /x)")
        ).as_instanceof_cause()

    monkeypatch.setattr(sweep, "run_sweep", teacher_task_fails)
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(mini_sweep(tmp_path)))
    assert main(["--space", str(tmp_path / "mini.yaml")]) == 2
    assert capsys.readouterr().err == "rayprune: error: imagenet not found (looked in /x)\n"


def test_a_sweep_with_failed_trials_exits_non_zero_with_the_resume_command(tmp_path, capsys, monkeypatch):
    from rayprune.orchestration import sweep

    outcome = sweep.SweepOutcome("mini-1", str(tmp_path / "results" / "mini-1"), "run", True, 4, failed_trials=1)
    monkeypatch.setattr(sweep, "run_sweep", lambda *args, **kwargs: outcome)
    space = tmp_path / "mini.yaml"
    space.write_text(yaml.safe_dump(mini_sweep(tmp_path)))
    assert main(["--space", str(space)]) == 1
    assert capsys.readouterr().err == (
        f"rayprune: error: 1 of 4 trials failed (their error.txt is under {tmp_path}/results/mini-1); fix the "
        f"cause, then retry them with: rayprune sweep --space {space} --resume mini-1\n"
    )


def test_duplicate_specs_in_a_cell_are_trained_once_and_the_sweep_says_so(local_ray, tmp_path, capsys):
    # uniform ignores maximum rates that do not bind: with Optuna choosing them only (allocation off,
    # so the cell runs 2 trials), both trials of the cell choose one subnet
    cfg = parse_sweep(
        mini_sweep(
            tmp_path,
            grid={"flops_targets": [0.5], "kd_weights": [0.0]},
            teacher=None,
            methods=[{"name": "uniform", "hparams": {"eval_epochs": 1}}],
            optuna={"samples_per_cell": 2, "seed": 0, "stage_prune": [[0.7, 0.8]] * 3, "allocation": False},
            recipes={"search": {"epochs": 1, "batch_size": 64}, "finetune": {"epochs": 1, "batch_size": 64}},
            max_concurrent_trials=1,
        )
    )
    outcome = run_sweep(cfg)
    assert outcome.complete
    experiment_path = Path(outcome.experiment_path)
    rows = store_of(experiment_path).rows()
    finals = [r for r in rows if r["kind"] == "final"]
    assert len(finals) == 2 and len({r["spec_hash"] for r in finals}) == 1
    trained = [r for r in finals if "reused_from" not in r["source"]]
    reused = [r for r in finals if r["source"].get("reused_from")]
    assert len(trained) == 1 and len(reused) == 1
    assert (
        reused[0]["source"]["reused_from"] == trained[0]["trial_id"] and reused[0]["metrics"] == trained[0]["metrics"]
    )
    # the search recipe and the final recipe are equal here: the end-of-sweep fine-tune reuses it too,
    # and the no-teacher baseline is the unpruned net trained once with recipes.finetune
    (tuned,) = [r for r in rows if r["kind"] == "finetuned"]
    assert tuned["metrics"]["test_top1"] == trained[0]["metrics"]["test_top1"]
    entries = [k for k in os.listdir(experiment_path / "final_cache")]
    assert sorted(entries) == ["baseline", "uniform_f0.5_kd0"]
    assert len(os.listdir(experiment_path / "final_cache" / "uniform_f0.5_kd0")) == 1  # one training in all
    out = capsys.readouterr().out
    assert out.count("cell uniform_f0.5_kd0: its 2 trials all chose the same subnet") == 1
    assert re.search(r"uniform_f0.5_kd0\s+trials 2\s+distinct 1\s+reused 1", out)
    parent = MlflowClient(cfg.tracking.uri).get_run(outcome.parent_run_id)
    assert parent.data.tags["rayprune.budgets_do_not_bind.uniform_f0.5_kd0"] == "true"
    assert parent.data.metrics["cells/uniform_f0.5_kd0/reused_trials"] == 1


def test_l1_trials_under_different_allocations_choose_different_subnets(local_ray, tmp_path, capsys):
    # a quickstart l1 cell (digits, cifar_resnet:tiny at 8x8, its stage ranges): maximum rates alone
    # rarely bind l1's global ranking (issue 20: 3 of the quickstart's 4 l1 cells chose one subnet);
    # the allocation Optuna proposes moves it
    cfg = parse_sweep(
        mini_sweep(
            tmp_path,
            dataset={"name": "digits"},
            input_size=8,
            teacher=None,
            methods=[{"name": "l1", "hparams": {"pretrain_epochs": 1, "bn_recal_batches": 1}}],
            grid={"flops_targets": [0.5], "kd_weights": [0.0]},
            optuna={"samples_per_cell": 2, "seed": 0, "stage_prune": [[0.2, 0.8]] * 3},
            recipes={"search": {"epochs": 1, "batch_size": 64}, "finetune": {"epochs": 1, "batch_size": 64}},
            finetune_front=False,
        )
    )
    outcome = run_sweep(cfg)
    assert outcome.complete
    check_tracking(cfg, Path(outcome.experiment_path), cells=[(0.5, 0.0)] * 2)
    out = capsys.readouterr().out
    assert re.search(r"l1_f0.5_kd0\s+trials 2\s+distinct 2\s+reused 0\s+outside 0", out)
    assert "all chose the same subnet" not in out
    # the shared study's progress is on the parent run, from the searcher's two told rounds
    files = {f.path for f in MlflowClient(cfg.tracking.uri).list_artifacts(outcome.parent_run_id, "studies")}
    assert files == {"studies/best_objective.png", "studies/trials.json"}


@pytest.fixture(scope="module")
def digits_sweep(local_ray, tmp_path_factory):
    """The quickstart's shape, once for the tests below: digits at 8x8 (learnable in a few
    epochs), targets far apart, no teacher. Returns the config and the outcome."""
    tmp_path = tmp_path_factory.mktemp("digits")
    cfg = parse_sweep(
        mini_sweep(
            tmp_path,
            dataset={"name": "digits"},
            input_size=8,
            teacher=None,
            methods=[{"name": "uniform", "hparams": {"eval_epochs": 1}}],
            grid={"flops_targets": [0.3, 0.9], "kd_weights": [0.0]},
            optuna={"samples_per_cell": 1, "seed": 0, "stage_prune": [[0.8, 0.9]] * 3},
            recipes={
                "search": {"epochs": 1, "batch_size": 64, "lr": 0.05},
                "finetune": {"epochs": 4, "batch_size": 64, "lr": 0.05},
            },
        )
    )
    return cfg, run_sweep(cfg)


def test_final_front_covers_the_macs_axis(digits_sweep):
    # the equally-treated final front has a point at each target, and every reported subnet is in its window
    _, outcome = digits_sweep
    front = outcome.fronts["final/kd0"]
    assert len(front) > 1 and {m["flops_target"] for m in front} == {0.3, 0.9}
    assert {m["recipe"] for m in front} == {"e4 cosine lr0.05 bs64 kd0"} and {m["kind"] for m in front} == {"finetuned"}
    rows = store_of(Path(outcome.experiment_path)).rows()
    finals = [r for r in rows if r["kind"] == "final"]
    assert len(finals) == 2 and all(r["source"]["window"]["status"] == "in_window" for r in finals)
    baseline = next(r for r in rows if r["kind"] == "unpruned")  # no teacher: trained once with recipes.finetune
    assert baseline["source"]["recipe_tag"] == "e4 cosine lr0.05 bs64 kd0" and baseline["init"] == "scratch"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextlib.contextmanager
def served_model(model_uri: str, tracking_uri: str, timeout_s: float = 300.0):
    """Start ``mlflow models serve --env-manager local`` on a free loopback port; yields a function
    that waits (bounded) until /ping answers and returns the base URL, so the caller can work
    while the server starts. The server's process group is always killed afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # it execs uvicorn
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: uvicorn and its worker die with it
    )
    deadline = time.monotonic() + timeout_s

    def wait_up() -> str:
        base = f"http://127.0.0.1:{port}"
        while True:
            assert server.poll() is None, f"mlflow models serve exited: {server.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"mlflow models serve did not answer /ping within {timeout_s:g} s"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        return base
            except OSError:
                time.sleep(0.25)

    try:
        yield wait_up
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone when the server failed to start
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        server.stderr.close()


def test_the_digits_pick_predicts_8x8_batches_through_pyfunc_and_rest(digits_sweep, tmp_path, monkeypatch):
    """The quickstart's bug: the efficient pick of a sweep trained on 8x8 digits was registered
    for 32x32 input. Its ONNX model, signature and card now take 8x8 batches, answer like torch,
    and refuse 32x32 ones through mlflow.pyfunc and over REST."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from rayprune.cli import main as cli_main
    from rayprune.models import subnet_io

    cfg, outcome = digits_sweep
    tuned = sorted((Path(outcome.experiment_path) / "rayprune" / "finetuned").iterdir())  # what MLflow got
    assert len(tuned) == 2 and {subnet_io.load(d).input_size for d in tuned} == {8}  # saved, not derived
    uri, out = cfg.tracking.uri, tmp_path / "efficient"
    pick = ["pick", "--experiment", cfg.tracking.experiment, "--mlflow-uri", uri, "--mode", "efficient"]
    assert cli_main([*pick, "--max-drop", "1", "--out", str(out), "--onnx-exporter", "torchscript"]) == 0
    model_uri = f"models:/rayprune-{cfg.tracking.experiment}@efficient"
    with served_model(model_uri, uri) as server_url:  # it starts while pyfunc is checked
        spec = json.loads((out / "spec.json").read_text())
        net = models.build(spec)
        net.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
        x8, x32 = (torch.randn(4, 3, n, n, generator=torch.Generator().manual_seed(n)).numpy() for n in (8, 32))
        with torch.no_grad():
            want = net.eval()(torch.from_numpy(x8)).numpy()
        card = (out / "model_card.md").read_text()
        assert f"* family: `cifar_resnet`, input 3x8x8, {spec['num_classes']} classes" in card
        assert "* input: float32 tensor [batch, 3, 8, 8]" in card and "x32" not in card

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
        loaded = mlflow.pyfunc.load_model(model_uri)
        assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 3, 8, 8)
        assert np.abs(loaded.predict(x8)["logits"] - want).max() <= 1e-4
        with pytest.raises(MlflowException, match=r"does not match expected shape \(-1, 3, 8, 8\)") as refused:
            loaded.predict(x32)
        assert refused.value.error_class == "SCHEMA_ENFORCEMENT_FAILED"

        base = server_url()
        status, body = post_json(f"{base}/invocations", {"inputs": x8.tolist()})
        assert status == 200, body
        assert np.abs(np.asarray(json.loads(body)["predictions"]["logits"]) - want).max() <= 1e-4
        status, body = post_json(f"{base}/invocations", {"inputs": x32.tolist()})
        assert status == 400 and json.loads(body)["error_class"] == "SCHEMA_ENFORCEMENT_FAILED", body[-500:]
        assert "does not match expected shape (-1, 3, 8, 8)" in json.loads(body)["message"]


def test_the_tracking_callback_finds_only_its_own_live_tracker():
    """The callback is pickled with the experiment and unpickled on --resume: it holds only the
    sweep id and finds the tracker run_sweep bound for the sweep's duration."""
    import pickle
    from types import SimpleNamespace

    from rayprune.orchestration import sweep as sweep_module

    callback = pickle.loads(pickle.dumps(sweep_module.TrackingCallback("s1")))
    with pytest.raises(RuntimeError, match="no live tracker"):
        _ = callback.tracker
    live = sweep_module._LIVE_TRACKER.set(SimpleNamespace(sweep_id="s2"))
    try:
        with pytest.raises(RuntimeError, match="no live tracker"):
            _ = callback.tracker
    finally:
        sweep_module._LIVE_TRACKER.reset(live)
    tracker = SimpleNamespace(sweep_id="s1")
    live = sweep_module._LIVE_TRACKER.set(tracker)
    try:
        assert callback.tracker is tracker
    finally:
        sweep_module._LIVE_TRACKER.reset(live)
