"""The shared conformance test: every method passes it on the tiny preset on CPU in seconds.

Each method class declares ``smoke: ClassVar[dict]``, hyperparameters for a seconds-long run.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rayprune import models
from rayprune.engine.data import synthetic_dataset
from rayprune.engine.train import TrainConfig
from rayprune.methods import MODULES, Budget, RunContext, get_method, within_budget

METHOD_NAMES = list(MODULES)


def make_ctx(tmp_path, budget=0.5, kd_weight=0.0, seed=0, max_stage_prune=None):
    spec = models.full_spec("cifar_resnet:tiny", num_classes=4, shortcut="avgpool_conv")
    train, test = synthetic_dataset(n_train=160, n_test=64, num_classes=4, size=16, seed=0)
    teacher = models.build(spec) if kd_weight > 0 else None
    return RunContext(spec=spec, train=train, test=test,
                      budget=Budget(flops_target=budget, max_stage_prune=max_stage_prune),
                      kd_weight=kd_weight, teacher=teacher, device="cpu", seed=seed, workdir=tmp_path,
                      finetune=TrainConfig(epochs=1, batch_size=32, lr=0.05), input_size=16,
                      progress=False, measure_latency=True, robust=True, latency_batch_sizes=(1,),
                      latency_repeats=3, robust_max_samples=32)


def run_steps(method, n=2):
    return [method.step() for _ in range(n) if not method.done]


def assert_record_ok(rec, ctx):
    models.validate(rec.spec)
    assert rec.macs == models.macs(rec.spec, ctx.input_size)
    assert rec.params == models.params(rec.spec)
    assert all(math.isfinite(v) for v in rec.metrics.values()), rec.metrics
    assert rec.method


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_specs_valid_finite_and_in_budget(name, tmp_path):
    cls = get_method(name)
    ctx = make_ctx(tmp_path, budget=0.5, max_stage_prune=[0.7, 0.7, 0.7])
    method = cls(ctx, cls.smoke)
    results = run_steps(method, 2)
    assert results, "step() must run at least once before done"
    for r in results:
        assert all(math.isfinite(v) for v in r.metrics.values()), r.metrics
        for rec in r.subnets:
            assert_record_ok(rec, ctx)
            assert "val_top1" in rec.metrics
    best = method.best()
    assert_record_ok(best, ctx)
    assert within_budget(best.spec, ctx.spec, ctx.budget, ctx.input_size), (best.macs, ctx.budget)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_same_seed_same_result(name, tmp_path):
    cls = get_method(name)
    outs = []
    for i in range(2):
        torch.manual_seed(1234 + i)  # global RNG state must not leak into the method
        method = cls(make_ctx(tmp_path / str(i), seed=7), cls.smoke)
        results = run_steps(method, 2)
        outs.append(([r.metrics for r in results], [[s.spec for s in r.subnets] for r in results],
                     method.best().spec))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_dict_round_trip_resumes_exactly(name, tmp_path):
    cls = get_method(name)
    a = cls(make_ctx(tmp_path / "a", seed=3), cls.smoke)
    a.step()
    state = copy.deepcopy(a.state_dict())
    # Save/load through torch.save with weights_only=True, as checkpoints are stored.
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    b = cls(make_ctx(tmp_path / "b", seed=3), cls.smoke)
    b.load_state_dict(state)
    if a.done:
        assert b.done
        return
    ra, rb = a.step(), b.step()
    assert ra.metrics == rb.metrics
    assert [s.spec for s in ra.subnets] == [s.spec for s in rb.subnets]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_finalize_reports_true_macs(name, tmp_path):
    cls = get_method(name)
    ctx = make_ctx(tmp_path, kd_weight=0.9)
    torch.manual_seed(4321)
    caller_rng = torch.get_rng_state()
    method = cls(ctx, cls.smoke)
    method.run(max_steps=2)
    final = method.finalize(progress=False)
    # Search and fine-tune draw from their own seeded generators, never the caller's stream.
    assert torch.equal(torch.get_rng_state(), caller_rng)
    rec = final.record
    assert rec.macs == models.macs(rec.spec, ctx.input_size)
    for key in ("test_top1", "test_top5", "robust_top1", "latency_ms_b1_p50"):
        assert key in rec.metrics and math.isfinite(rec.metrics[key]), key
    net = models.build(rec.spec)
    net.load_state_dict(final.state_dict)  # strict: the weights match the spec exactly
