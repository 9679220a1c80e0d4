"""A sweep of a user network (docs/examples/two_branch_sweep.yaml: l1 on digits, one trial per cell
here) on a local Ray: it finishes with a front, and the efficient pick exports an ONNX model that answers
like the torch net built from the exported spec and weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from rayprune import models
from rayprune.cli import main as cli_main
from rayprune.orchestration.config import parse_sweep
from rayprune.orchestration.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "docs" / "examples" / "two_branch_sweep.yaml"


@pytest.mark.slow  # a whole sweep: Ray, 2 trials, the front's fine-tunes and latency, MLflow
@pytest.mark.ray
def test_a_sweep_of_a_user_network_ends_in_a_front_and_an_onnx_pick(local_ray, tmp_path, monkeypatch):
    """On the shared local Ray, whose workers import the user's file from its path (shipping it to
    workers where that path does not exist: test_traced_cluster)."""
    monkeypatch.chdir(ROOT)  # the sweep file names the model relative to the repository root
    raw = yaml.safe_load(SWEEP.read_text())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw.update(tracking={"uri": uri, "experiment": "two-branch"}, storage_path=str(tmp_path / "results"))
    raw["recipes"] = {name: {**recipe, "epochs": 1} for name, recipe in raw["recipes"].items()}  # seconds, not minutes
    raw["max_concurrent_trials"] = 1  # the trials share one reused worker (each new one imports torch and Tune)
    # One trial per cell instead of the file's two: both cells still reach the front. (Two samples
    # a cell under a shared study: test_orchestration_sweep's l1 sweep.)
    assert raw["optuna"]["samples_per_cell"] == 2 and len(raw["grid"]["flops_targets"]) == 2
    raw["optuna"]["samples_per_cell"] = 1
    cfg = parse_sweep(raw)
    assert cfg.model == f"{ROOT}/docs/examples/two_branch.py:two_branch" and cfg.num_trials() == 2

    outcome = run_sweep(cfg)

    assert outcome.complete and outcome.num_trials == 2 and outcome.failed_trials == 0
    front = outcome.fronts["final/kd0"]
    assert front and {m["kind"] for m in front} == {"finetuned"}
    full = models.macs(cfg.full_spec(), 8)
    assert all(m["macs"] <= 0.7 * full for m in front)

    out = tmp_path / "efficient"
    pick = ["pick", "--experiment", "two-branch", "--mlflow-uri", uri, "--mode", "efficient", "--max-drop", "1"]
    assert cli_main([*pick, "--out", str(out), "--onnx-exporter", "torchscript", "--no-register"]) == 0
    spec = json.loads((out / "spec.json").read_text())
    assert spec["family"] == "traced" and spec["source"] == cfg.model
    assert models.macs(spec, 8) in {m["macs"] for m in front}
    net = models.build(spec).eval()
    net.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == (5, 10) and np.abs(got - want).max() <= 1e-4
