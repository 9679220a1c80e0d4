"""Pretrained starts (``--weights``): a state_dict file or torchvision's local cache, the
classifier head re-initialised when the classes differ, every other mismatch refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rayprune import models
from rayprune.models.weights import WeightsError, apply_weights, read_weights
from rayprune.testing import tiny_context
from rayprune.testing.bad_input import refused

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "two_branch.py"


@pytest.fixture(scope="module")
def spec10():
    return models.full_spec(f"{EXAMPLE}:two_branch", num_classes=10, input_size=16)


def saved(tmp_path, spec, seed=5, edit=None):
    state = models.build(spec, seed=seed).state_dict()
    if edit:
        edit(state)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return path, state


def test_a_state_dict_file_starts_the_net(tmp_path, spec10):
    path, state = saved(tmp_path, spec10)
    net = models.build(spec10, seed=0)
    assert apply_weights(net, spec10, str(path)) is None
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_head_for_other_classes_is_reinitialised_with_a_note(tmp_path, spec10):
    path, state = saved(tmp_path, spec10)
    spec4 = {**spec10, "num_classes": 4}
    net = models.build(spec4, seed=0)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    note = apply_weights(net, spec4, str(path))
    assert note is not None and "'head'" in note and "re-initialised" in note
    for key, value in net.state_dict().items():
        assert torch.equal(value, fresh[key] if key.startswith("head.") else state[key]), key


def test_any_other_mismatch_names_the_first_bad_key(tmp_path, spec10):
    path, _ = saved(tmp_path, spec10, edit=lambda s: s.__setitem__("left.0.weight", torch.zeros(3, 3)))
    with pytest.raises(WeightsError, match=r"'left\.0\.weight' has shape \(3, 3\)"):
        apply_weights(models.build(spec10), spec10, str(path))
    path, _ = saved(tmp_path, spec10, edit=lambda s: s.__setitem__("extra", torch.zeros(1)))
    with pytest.raises(WeightsError, match="unexpected key 'extra'"):
        apply_weights(models.build(spec10), spec10, str(path))


def test_torchvision_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = {"family": "traced", "source": "torchvision:resnet18"}
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth is not in the local torch hub cache; put it"):
        read_weights(spec, "torchvision:DEFAULT")
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"fc.bias": torch.ones(3)}, cached)
    assert torch.equal(read_weights(spec, "torchvision:ResNet18_Weights.IMAGENET1K_V1")["fc.bias"], torch.ones(3))


def test_the_run_context_starts_the_unpruned_net_from_them(tmp_path, spec10):
    spec4 = {**spec10, "num_classes": 4}
    state = models.build(spec4, seed=7).state_dict()
    ctx = tiny_context(tmp_path, spec=spec4, initial_state=state)
    for key, value in ctx.unpruned_net(seed=0).state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bad_weights_are_refused_in_one_line(capsys, tmp_path, spec10):
    path, _ = saved(tmp_path, spec10, edit=lambda s: s.pop("stem.0.weight"))
    base = ["run", "--model", f"{EXAMPLE}:two_branch", "--dataset", "digits", "--flops-target", "0.5"]
    out = ["--out", str(tmp_path / "out")]
    refused(capsys, tmp_path, [*base, "--method", "l1", "--weights", str(path), *out], "no tensor for 'stem.0.weight'")
    refused(capsys, tmp_path, [*base, "--method", "uniform", "--weights", str(path), *out], "from scratch")
    missing = str(tmp_path / "none.pt")
    refused(capsys, tmp_path, [*base, "--method", "l1", "--weights", missing, *out], "does not exist")


def test_a_sweep_file_takes_weights_for_every_trial(capsys, tmp_path, monkeypatch):
    from rayprune.grid import CellKey
    from rayprune.orchestration.config import parse_sweep
    from rayprune.orchestration.sweep import param_space
    from rayprune.orchestration.trial_spec import TrialSpec, sample_config

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((EXAMPLE.parent / "two_branch_sweep.yaml").read_text())
    raw.update(model=f"{EXAMPLE}:two_branch", tracking={"uri": "sqlite:///m.db", "experiment": "w"})
    assert "weights" not in parse_sweep(raw).model_dump()  # unset: recorded as before
    spec = models.full_spec(raw["model"], num_classes=10, input_size=8)  # digits: 10 classes, 8x8
    path, _ = saved(tmp_path, spec)
    cfg = parse_sweep({**raw, "weights": path.name})
    assert cfg.weights == str(path) and cfg.model_dump()["weights"] == str(path)  # made absolute
    shared = param_space(cfg, None)
    trial = {**shared, **sample_config(0, CellKey("l1", 0.5, 0.0), [0.8] * 3, 0)}
    assert TrialSpec.from_config(trial).trial_config().weights == str(path)

    space = tmp_path / "sweep.yaml"
    bad, _ = saved(
        tmp_path, models.full_spec(raw["model"], num_classes=10, input_size=8), edit=lambda s: s.pop("head.bias")
    )
    space.write_text(yaml.safe_dump({**raw, "weights": str(bad)}))
    refused(capsys, tmp_path, ["sweep", "--space", str(space)], "weights: weights", "no tensor for 'head.bias'")
    uniform = {**raw, "weights": str(bad), "methods": [{"name": "uniform"}]}
    space.write_text(yaml.safe_dump(uniform))
    refused(capsys, tmp_path, ["sweep", "--space", str(space)], "weights: uniform trains its subnets from scratch")
