"""The graph step (the function a CUDA graph captures), run uncaptured on the CPU, against the
eager loop of ``fit``; and the plan that chooses between them, visible in the records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from rayprune import models
from rayprune.engine import TrainConfig, fit, make_loader, synthetic_dataset
from rayprune.engine.captured import CAPTURE_MIN_STEPS, CapturedForward, StepPlan, plan_step
from rayprune.engine.data import Loader

BATCH = 8
SAMPLES = 14  # 2 batches an epoch: 8, then 6 padded to 8


@contextmanager
def one_thread() -> Iterator[None]:
    """One thread, so two runs' reductions add in the same order; the count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _net(seed: int) -> torch.nn.Module:
    return models.build(models.full_spec("cifar_resnet:tiny", num_classes=4), seed=seed)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


def _train(capture: bool, cfg: TrainConfig, train, teacher):
    model = _net(seed=1)
    snapshots = []

    def snapshot(entry):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    loader = make_loader(train, BATCH, train=True, seed=5, drop_last=False)
    history = fit(model, loader, cfg, teacher=teacher, seed=0, capture=capture, on_epoch=snapshot, progress=False)
    return history, snapshots


@pytest.fixture(scope="module")
def runs():
    train, _ = synthetic_dataset(n_train=SAMPLES, n_test=4, num_classes=4, size=16, seed=2)
    teacher = _net(seed=7).eval()
    cfg = TrainConfig(
        epochs=2, batch_size=BATCH, lr=0.05, warmup_epochs=0.5, kd_weight=0.6, label_smoothing=0.1, grad_clip=2.0
    )
    with torch.random.fork_rng(), one_thread():  # one thread: the reductions of both runs add in the same order
        return _train(False, cfg, train, teacher), _train(True, cfg, train, teacher)


def test_graph_step_matches_the_eager_loop_across_an_epoch_boundary(runs):
    (eager, eager_weights), (graph, graph_weights) = runs
    assert eager.step == StepPlan("eager", "capture turned off", "padded")
    assert graph.step.mode == "uncaptured" and graph.step.last_batch == "padded"
    assert len(eager) == len(graph) == 2
    for e, g in zip(eager, graph, strict=True):
        assert abs(g["loss"] - e["loss"]) <= 1e-5 * abs(e["loss"])
        assert g["lr"] == pytest.approx(e["lr"], rel=1e-6)
    for epoch_e, epoch_g in zip(eager_weights, graph_weights, strict=True):
        assert epoch_e.keys() == epoch_g.keys()
        for name, tensor in epoch_e.items():
            if tensor.is_floating_point():
                assert _relative_error(tensor, epoch_g[name]) <= 1e-5, name
            else:  # BN's num_batches_tracked: the padded batch counts once, as the ragged one does
                assert torch.equal(tensor, epoch_g[name]), name


def test_the_runs_trained(runs):
    (_, eager_weights), _ = runs
    start = _net(seed=1).state_dict()
    floats = [k for k in start if start[k].is_floating_point()]
    moved = [_relative_error(start[k], eager_weights[-1][k]) for k in floats]
    assert min(moved) > 2e-5  # every tensor moved by more than the comparison's tolerance
    overall = _relative_error(
        torch.cat([start[k].flatten() for k in floats]), torch.cat([eager_weights[-1][k].flatten() for k in floats])
    )
    assert overall > 1e-2


def test_a_padded_batch_normalises_over_its_real_samples_only():
    """The padded rows hold real images (index 0): unmasked, they would shift BN's statistics."""
    train, _ = synthetic_dataset(n_train=SAMPLES, n_test=4, num_classes=4, size=16, seed=2)
    plain = TrainConfig(epochs=1, batch_size=16, lr=0.05)  # one padded batch of 14 real + 2 padding
    a, b = _net(1), _net(1)
    loader_a = make_loader(train, 16, train=True, seed=5, drop_last=False)
    loader_b = make_loader(train, 16, train=True, seed=5, drop_last=False)
    with torch.random.fork_rng(), one_thread():
        fit(a, loader_a, plain, capture=False, progress=False)
        h = fit(b, loader_b, plain, capture=True, progress=False)
    assert h.step.last_batch == "padded"
    assert loader_b.batch_size * len(loader_b) == 16 != SAMPLES
    for name, tensor in a.state_dict().items():
        if tensor.is_floating_point():
            assert _relative_error(tensor, b.state_dict()[name]) <= 1e-5, name


def test_the_default_plan_falls_back_to_eager_on_the_cpu_and_says_why():
    train, _ = synthetic_dataset(n_train=16, n_test=4, num_classes=4, size=16, seed=2)
    history = fit(_net(1), train, TrainConfig(epochs=1, batch_size=BATCH), progress=False)
    assert history.step.as_record() == {
        "mode": "eager",
        "reason": "cpu: CUDA graphs need a GPU",
        "last_batch": "none",
    }
    assert history.step.describe() == "eager (cpu: CUDA graphs need a GPU)"


def test_the_plan_on_cuda():
    train, _ = synthetic_dataset(n_train=20, n_test=4, num_classes=4, size=16, seed=2)
    loader = make_loader(train, BATCH, train=True)  # drops the ragged batch of 4
    cuda, net = torch.device("cuda"), _net(1)
    assert plan_step(net, loader, cuda, CAPTURE_MIN_STEPS) == StepPlan(
        "captured", "device-resident data on CUDA", "dropped"
    )
    short = plan_step(net, loader, cuda, CAPTURE_MIN_STEPS - 1)
    assert short.mode == "eager" and short.reason == f"199 steps, under the capture's break-even of {CAPTURE_MIN_STEPS}"
    assert plan_step(net, loader, cuda, 10, capture=True).mode == "captured"
    assert plan_step(net, loader, cuda, 10**4, custom_loss=True).reason == "a custom loss function"
    assert plan_step(net, loader, cuda, 10**4, compile=True).reason == "torch.compile requested"

    class Streaming(Loader):
        pass

    streaming = Streaming(train, BATCH, train=True, device=torch.device("cpu"), seed=0, drop_last=True)
    assert plan_step(net, streaming, cuda, 10**4).reason == "a streaming loader: batches are not device-resident"


def test_captured_forward_is_the_plain_call_on_the_cpu():
    net = _net(1).eval()
    x = torch.randn(2, 3, 16, 16)
    forward = CapturedForward(net, x)
    assert forward.graph is None
    with torch.inference_mode():
        assert torch.equal(forward(x), net(x))


@pytest.mark.slow  # a full `rayprune run`
def test_the_cli_and_the_record_say_how_the_fine_tune_ran(tmp_path, capsys):
    from rayprune.cli import main

    out = tmp_path / "run"
    args = ["run", "--method", "uniform", "--model", "cifar_resnet:tiny", "--dataset", "synthetic"]
    args += ["--flops-target", "0.5", "--finetune", "epochs=1", "--smoke", "--out", str(out)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "fine-tune steps: eager (cpu: CUDA graphs need a GPU)" in lines
    result = json.loads((out / "result.json").read_text())
    assert result["final"]["source"]["train_step"] == {
        "mode": "eager",
        "reason": "cpu: CUDA graphs need a GPU",
        "last_batch": "none",
    }


def test_captured_inference_on_the_cpu_gives_the_eager_numbers():
    from rayprune.engine import evaluate, measure_latency

    _, test = synthetic_dataset(n_train=4, n_test=20, num_classes=4, size=16, seed=2)
    net = _net(1)
    assert evaluate(net, test, batch_size=8, captured=True) == evaluate(net, test, batch_size=8)
    timing = measure_latency(net, (3, 16, 16), batch_sizes=(1, 4), warmup=1, repeats=2, captured=True)
    assert sorted(timing) == ["latency_ms_b1_p50", "latency_ms_b1_p90", "latency_ms_b4_p50", "latency_ms_b4_p90"]


@pytest.mark.parametrize("first", [False, True], ids=["eager-then-graph", "graph-then-eager"])
def test_a_run_resumed_with_the_other_step_matches_an_uninterrupted_one(tmp_path, first):
    """A checkpoint of either step resumes in the other: the learning rates change kind (device
    tensors of the fused optimizer, floats of the eager one) and the schedule goes on."""
    train, _ = synthetic_dataset(n_train=SAMPLES, n_test=4, num_classes=4, size=16, seed=2)
    cfg = TrainConfig(epochs=2, batch_size=BATCH, lr=0.05, warmup_epochs=0.5)

    def run(capture, checkpoint_dir=None, stop_after_first=False):
        model = _net(seed=1)
        loader = make_loader(train, BATCH, train=True, seed=5, drop_last=False)
        history = fit(
            model,
            loader,
            cfg,
            capture=capture,
            checkpoint_dir=checkpoint_dir,
            on_epoch=(lambda entry: True) if stop_after_first else None,
            progress=False,
        )
        return model, history

    with torch.random.fork_rng(), one_thread():
        whole, whole_history = run(not first)
        run(first, tmp_path, stop_after_first=True)
        resumed, history = run(not first, tmp_path)
    assert [e["lr"] for e in history] == pytest.approx([e["lr"] for e in whole_history], rel=1e-6)
    assert all(type(e["lr"]) is float for e in history)
    for name, tensor in whole.state_dict().items():
        if tensor.is_floating_point():
            assert _relative_error(tensor, resumed.state_dict()[name]) <= 1e-5, name


def test_loaded_learning_rates_take_the_kind_of_the_running_step():
    """A fused optimizer loading an eager checkpoint gets float lrs back from torch: a captured
    graph would freeze them, so they become device tensors again (and floats the other way)."""
    from rayprune.engine.captured import fused_optimizer, match_lr_kind
    from rayprune.engine.train import _param_groups, make_optimizer, make_scheduler

    cfg = TrainConfig(epochs=2, lr=0.1)
    net = _net(1)
    eager = make_optimizer(net, cfg)
    eager_schedule = make_scheduler(eager, cfg, 4)
    eager.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
    eager_schedule.step()
    fused = fused_optimizer(_param_groups(net, cfg.weight_decay, True), cfg, torch.device("cpu"))
    fused_schedule = make_scheduler(fused, cfg, 4)
    fused.load_state_dict(eager.state_dict())
    fused_schedule.load_state_dict(eager_schedule.state_dict())
    assert not isinstance(fused.param_groups[0]["lr"], torch.Tensor)  # what torch gives back
    match_lr_kind(fused, fused_schedule, torch.device("cpu"))
    lrs = [g["lr"] for g in fused.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in lrs) and all(g["fused"] for g in fused.param_groups)
    assert [float(lr) for lr in lrs] == pytest.approx([g["lr"] for g in eager.param_groups])
    fused_schedule.step()  # the schedule now fills the tensors in place
    assert fused.param_groups[0]["lr"] is lrs[0]

    eager.load_state_dict(fused.state_dict())
    eager_schedule.load_state_dict(fused_schedule.state_dict())
    match_lr_kind(eager, eager_schedule, None)
    assert all(type(g["lr"]) is float and g["fused"] is None for g in eager.param_groups)
