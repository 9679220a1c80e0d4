"""The front mode (issue 25): ``grid: {flops_targets: auto}`` searches the accuracy/MACs front with
one multi-objective study per (method, KD weight), then fine-tunes points of its Pareto set. Its
digits sweep (the quickstart's shape) also serves the efficient pick at 8x8 through pyfunc and REST."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
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
import torch
import yaml
from mlflow import MlflowClient

from rayprune import models
from rayprune.cli import main as cli_main
from rayprune.cli import sweep_main
from rayprune.orchestration.config import SweepConfig, parse_sweep
from rayprune.orchestration.front_mode import (
    FRONT_MODE,
    FrontRounds,
    FrontSearcher,
    hypervolume,
    pareto_indices,
    spread_targets,
    thin_evenly,
)
from rayprune.orchestration.search import FINAL_KEY, Outcome, Reachability
from rayprune.orchestration.sweep import run_sweep
from rayprune.testing.sweeps import mini_sweep
from rayprune.tracking.store import SubnetStore

SPEC = models.full_spec("cifar_resnet:tiny", num_classes=10, shortcut="avgpool_conv")
RANGES = [(0.2, 0.8)] * 3
GROUPS = [("l1", 0.0), ("uniform", 0.0), ("ast", 0.0)]
USE = {"l1": "allocation", "uniform": "target", "ast": "max_rates"}


# --------------------------------------------------------------------------------------------
# The front's arithmetic
# --------------------------------------------------------------------------------------------


def test_pareto_thinning_and_hypervolume_are_exact():
    points = [(0.9, 10.0), (0.8, 5.0), (0.85, 12.0), (0.6, 2.0), (0.6, 3.0), (0.9, 10.0)]
    assert pareto_indices(points) == [3, 1, 0]  # by MACs; dominated and repeated points left out
    assert thin_evenly([0.0, 1.0, 2.0, 4.8, 5.1, 10.0], 3) == [0, 4, 5]
    assert thin_evenly([1.0, 2.0], 8) == [0, 1]
    # the area over reference (0.5, 12): (5-2)*0.1 + (10-5)*0.3 + (12-10)*0.4
    assert hypervolume(points, (0.5, 12.0)) == pytest.approx(0.3 + 1.5 + 0.8)
    assert hypervolume(points, (0.95, 12.0)) == 0.0  # nothing beats the reference's accuracy
    assert spread_targets((0.2, 0.9), 4) == [0.2, 0.433, 0.667, 0.9]


# --------------------------------------------------------------------------------------------
# The studies: suggestions, determinism, resume
# --------------------------------------------------------------------------------------------


def make_rounds(seed: int = 0, sampler: str = "tpe") -> FrontRounds:
    return FrontRounds(
        GROUPS,
        7,
        RANGES,
        (0.2, 0.9),
        sampler=sampler,
        seed=seed,
        n_startup_trials=3,
        feasibility=Reachability(SPEC, 8),
        budget_use=USE,
    )


def val_of(config: dict) -> float:
    return 0.5 + 0.4 * config["flops_target"] - 0.1 * max(config["max_stage_prune"])


def drive(rounds: FrontRounds, order=lambda n: range(n)) -> list[dict]:
    configs = []
    while not rounds.finished():
        batch = [rounds.config(i) for i in range(len(rounds.next_round()))]
        for i in order(len(batch)):
            rounds.report(i, Outcome("complete", val_of(batch[i]), batch[i]["flops_target"] * 0.95))
        configs += batch
    return configs


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2"])  # gp works too, but takes 40 s here
def test_each_study_suggests_targets_over_the_range_with_its_budget(sampler):
    configs = drive(make_rounds(sampler=sampler))
    assert len(configs) == 21 and [c["cell"] for c in configs[:3]] == [0, 1, 2]  # one per study per round
    for cell, (method, _) in enumerate(GROUPS):
        mine = [c for c in configs if c["cell"] == cell]
        targets = [c["flops_target"] for c in mine]
        assert targets[:3] == [0.2, 0.55, 0.9] and all(0.2 <= t <= 0.9 for t in targets)  # spread, then the sampler
        assert len(set(targets)) >= 5 and all(round(t, 3) == t for t in targets)  # nsga2 may repeat one
        assert all(c["method"] == method for c in mine)
        assert all(Reachability(SPEC, 8)(c["flops_target"], c["max_stage_prune"]) <= 0 for c in mine)
        assert ("allocation" in mine[-1]) == (method == "l1")
        if method == "uniform":
            assert all(c["max_stage_prune"] == [0.8] * 3 for c in mine)


def test_one_seed_gives_one_sweep_whatever_order_the_trials_finish_in():
    first = drive(make_rounds(seed=5))
    assert drive(make_rounds(seed=5), order=lambda n: reversed(range(n))) == first
    assert drive(make_rounds(seed=6)) != first


def searcher(seed: int = 1) -> FrontSearcher:
    return FrontSearcher(
        GROUPS[:2], 6, RANGES, (0.2, 0.9), sampler="tpe", seed=seed, n_startup_trials=2, budget_use=USE
    )


def run_searcher(s: FrontSearcher, ids: range, save_to: Path | None = None, stop_after: int | None = None) -> list:
    """Tune's calls: suggest until None/FINISHED, complete each, repeat; with ``save_to``, save
    the state (as Tune's experiment snapshot) after ``stop_after`` suggestions and stop there."""
    configs, running = [], []
    for trial_id in (f"t{i}" for i in ids):
        config = s.suggest(trial_id)
        while config is None:  # the round runs: finish what runs, in reverse order
            for done, c in reversed(running):
                s.on_trial_complete(done, {FINAL_KEY: True, "val_top1": val_of(c), "flops_fraction": 0.9})
            running = []
            config = s.suggest(trial_id)
        if config == "FINISHED":
            break
        configs.append(config)
        running.append((trial_id, config))
        if save_to is not None and len(configs) == stop_after:
            s.save(str(save_to))
            return configs
    return configs


def test_a_resumed_searcher_suggests_what_the_uninterrupted_one_would(tmp_path):
    whole = run_searcher(searcher(), range(100))
    assert len(whole) == 12
    first = run_searcher(searcher(), range(100), tmp_path / "state.pkl", stop_after=5)  # mid-round
    resumed = searcher(seed=99)  # Tune rebuilds it from the snapshot: the seed comes back with it
    resumed.restore(str(tmp_path / "state.pkl"))
    # t4 (the third round's first trial) was running: the resumed sweep finishes it, then goes on
    resumed.on_trial_complete("t4", {FINAL_KEY: True, "val_top1": val_of(first[4]), "flops_fraction": 0.9})
    rest = run_searcher(resumed, range(100, 200))
    assert first + rest == whole
    assert pickle.loads(pickle.dumps(resumed.rounds)).history == resumed.rounds.history


# --------------------------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"flops_targets": "all"}, "grid.flops_targets: give a list of FLOPs targets in (0, 1], or auto"),
        ({"flops_targets": "auto", "target_range": [0.9, 0.3]}, "grid.target_range: must be [low, high] with 0 <"),
        ({"flops_targets": [0.5], "front_points": 4}, "grid: front_points is a front-mode key: set flops_targets"),
        ({"flops_targets": "auto", "front_points": 0}, "grid.front_points: Input should be greater than or equal"),
        ({"flops_targets": "auto", "target_range": [0.001, 0.5]}, "(grid.target_range starts at 0.001; raise it"),
    ],
)
def test_a_bad_front_mode_key_is_one_line_and_exit_2(tmp_path, capsys, grid, message):
    space = tmp_path / "front.yaml"
    space.write_text(yaml.safe_dump(mini_sweep(tmp_path, grid=grid, teacher=None)))
    assert sweep_main(["--space", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_grid_round_trips_and_a_grid_sweep_records_no_front_keys(tmp_path):
    # the driver hands its tasks the dumped config, which they validate again
    grid_cfg = parse_sweep(mini_sweep(tmp_path, teacher=None, grid={"flops_targets": [0.5, 0.7]}))
    front_cfg = parse_sweep(mini_sweep(tmp_path, teacher=None, grid={"flops_targets": "auto", "front_points": 3}))
    assert grid_cfg.model_dump(mode="json")["grid"] == {"flops_targets": [0.5, 0.7], "kd_weights": [0.0]}
    assert front_cfg.model_dump(mode="json")["grid"] == {
        "flops_targets": "auto",
        "kd_weights": [0.0],
        "target_range": [0.2, 0.9],
        "front_points": 3,
    }
    for cfg in (grid_cfg, front_cfg):
        assert SweepConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert (front_cfg.num_trials(), front_cfg.cells(), front_cfg.front_groups()) == (1, [], [("random", 0.0)])


# --------------------------------------------------------------------------------------------
# A digits sweep
# --------------------------------------------------------------------------------------------


def front_sweep(tmp_path: Path) -> dict:
    return mini_sweep(
        tmp_path,
        name="front",
        dataset={"name": "digits"},
        input_size=8,
        teacher=None,
        methods=[{"name": "uniform", "hparams": {"eval_epochs": 1}}],
        grid={"flops_targets": "auto", "target_range": [0.2, 0.9], "front_points": 4},
        optuna={"samples_per_cell": 4, "n_startup_trials": 4, "seed": 0, "stage_prune": [[0.8, 0.9]] * 3},
        recipes={
            "search": {"epochs": 1, "batch_size": 64, "lr": 0.05},
            "finetune": {"epochs": 3, "batch_size": 64, "lr": 0.05},
        },
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "front"},
    )


def outcome_rows(outcome) -> list[dict]:
    return SubnetStore(Path(outcome.experiment_path) / "rayprune" / "subnets.parquet").rows()


@pytest.fixture(scope="module")
def digits_front(local_ray, tmp_path_factory):
    """The quickstart's shape in the front mode, once for the tests below: digits at 8x8
    (learnable in a few epochs), uniform, no teacher, 4 trials at spread targets. Returns the
    config and the outcome."""
    cfg = parse_sweep(front_sweep(tmp_path_factory.mktemp("front")))
    return cfg, run_sweep(cfg)


def test_a_digits_front_sweep_gives_a_spread_final_front_from_one_recipe(digits_front, tmp_path):
    # 4 trials at the spread targets (0.2 ... 0.9); the Pareto set of their search-val top-1 is fine-tuned
    cfg, outcome = digits_front
    assert outcome.complete and outcome.num_trials == 4
    front = outcome.fronts["final/kd0"]
    macs = [m["macs"] for m in front]
    full = models.macs(cfg.full_spec(), 8)
    assert len(front) >= 3 and (max(macs) - min(macs)) / full >= 0.3, [(m["macs"] / full, m["metrics"]) for m in front]
    assert {m["kind"] for m in front} == {"finetuned"} and {m["source"]["search_mode"] for m in front} == {FRONT_MODE}
    # equally treated: every front member and the no-teacher baseline (the unpruned net trained
    # once from scratch with recipes.finetune) come from the one fine-tune recipe
    recipe = "e3 cosine lr0.05 bs64 kd0"
    assert {m["recipe"] for m in front} == {recipe}
    baseline = next(r for r in outcome_rows(outcome) if r["kind"] == "unpruned")
    assert baseline["source"]["recipe_tag"] == recipe and baseline["init"] == "scratch"
    finals = [r for r in outcome_rows(outcome) if r["kind"] == "final"]
    assert len(finals) == 4 and all(r["source"]["window"]["status"] == "in_window" for r in finals)
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("front")
    runs = client.search_runs([experiment.experiment_id], "params.search_mode = 'front'")
    tuned = [r for r in outcome_rows(outcome) if r["kind"] == "finetuned"]  # the search-val Pareto set, <= 4
    assert len(runs) == len(tuned) >= 3 and {r.info.run_name for r in runs} == {
        f"finetune-uniform_f{r['flops_target']:g}_kd0" for r in tuned
    }


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


def test_the_digits_pick_predicts_8x8_batches_through_pyfunc_and_rest(digits_front, tmp_path, monkeypatch):
    """The quickstart's bug: the efficient pick of a sweep trained on 8x8 digits was registered
    for 32x32 input. Its ONNX model, signature and card now take 8x8 batches, answer like torch,
    and refuse 32x32 ones through mlflow.pyfunc and over REST."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from rayprune.models import subnet_io

    cfg, outcome = digits_front
    tuned = sorted((Path(outcome.experiment_path) / "rayprune" / "finetuned").iterdir())  # what MLflow got
    assert len(tuned) >= 3 and {subnet_io.load(d).input_size for d in tuned} == {8}  # saved, not derived
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
