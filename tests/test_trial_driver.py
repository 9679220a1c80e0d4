"""runner.drive: the one trial loop (step -> checkpoint -> report) and its one state file."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from rayprune.engine.checkpoint import atomic_save
from rayprune.methods import get_method
from rayprune.runner import STATE_FILE, TrialState, drive, restore


def test_each_step_is_checkpointed_before_it_is_reported_and_resumes_exactly(tmp_path, make_ctx):
    cls = get_method("uniform")
    method = cls(make_ctx(workdir=tmp_path / "a"), cls.smoke)
    seen = []

    def report(result, state, d):
        saved = TrialState.load(d / STATE_FILE)  # already on disk when reported
        assert saved.steps == state.steps and len(saved.subnets) == len(state.subnets)
        seen.append(result.step)

    state = drive(
        method, TrialState(config={"k": 1}), report, max_steps=1, checkpoint_dir=lambda: nullcontext(tmp_path)
    )
    assert seen == [0] and state.steps == 1 and state.history[0]["step"] == 0
    again = cls(make_ctx(workdir=tmp_path / "b"), cls.smoke)
    resumed = restore(again, TrialState.load(tmp_path / STATE_FILE))
    assert resumed.config == {"k": 1} and resumed.subnets == state.subnets
    rest = drive(again, resumed, lambda *_: None, checkpoint_dir=lambda: nullcontext(tmp_path))
    assert again.done and rest.steps == len(rest.history) >= 1


def test_older_state_files_still_load(tmp_path):
    weights = {"w": torch.ones(2)}
    atomic_save({"method": weights, "steps": 3}, tmp_path / "tune.pt")  # the old Tune checkpoint
    old_tune = TrialState.load(tmp_path / "tune.pt")
    assert old_tune.steps == 3 and old_tune.history == [] and old_tune.config is None
    atomic_save(
        {"method": weights, "subnets": [{"a": 1}], "history": [{"step": 0}, {"step": 1}], "config": {"seed": 0}},
        tmp_path / "run.pt",
    )  # the old `rayprune run` state
    old_run = TrialState.load(tmp_path / "run.pt")
    assert old_run.steps == 2 and old_run.subnets == [{"a": 1}] and old_run.config == {"seed": 0}
