"""The method contract: every method passes these checks on the tiny preset, on CPU, in seconds.

Each check takes the method class and a scratch directory and raises ``AssertionError`` on a
violation. The method class must declare ``smoke: ClassVar[dict]``, hyperparameters for a
seconds-long run. :func:`check_method` runs them all; ``CHECKS`` lists them for parametrized tests.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from .. import models
from ..engine.checkpoint import safe_load
from ..methods.base import Method, RunContext, StepResult, SubnetRecord, within_budget
from ..methods.finetune import finalize
from .context import tiny_context, tiny_spec

MethodClass = type[Method]


def conformance_context(
    workdir: str | Path,
    budget: float = 0.5,
    kd_weight: float = 0.0,
    seed: int = 0,
    max_stage_prune: list[float] | None = None,
) -> RunContext:
    """The tiny context with latency and robust accuracy on (at their cheapest settings)."""
    teacher = models.build(tiny_spec()) if kd_weight > 0 else None
    return tiny_context(
        workdir,
        budget=budget,
        max_stage_prune=max_stage_prune,
        kd_weight=kd_weight,
        teacher=teacher,
        seed=seed,
        measure_latency=True,
        robust=True,
        latency_batch_sizes=(1,),
        latency_repeats=3,
        robust_max_samples=32,
    )


def run_steps(method: Method, n: int = 2) -> list[StepResult]:
    return [method.step() for _ in range(n) if not method.done]


def assert_record_ok(rec: SubnetRecord, ctx: RunContext) -> None:
    models.validate(rec.spec)
    assert rec.macs == models.macs(rec.spec, ctx.input_size)
    assert rec.params == models.params(rec.spec)
    assert all(math.isfinite(v) for v in rec.metrics.values()), rec.metrics
    assert rec.method


def check_specs_valid_finite_and_in_budget(cls: MethodClass, workdir: Path) -> None:
    """Every evaluated subnet is a valid spec with exact MACs/params, finite metrics and a
    search-val score; the chosen one is within the budget."""
    ctx = conformance_context(workdir, budget=0.5, max_stage_prune=[0.7, 0.7, 0.7])
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


def check_same_seed_same_result(cls: MethodClass, workdir: Path) -> None:
    """The same seed gives the same steps and the same choice, whatever the global RNG state."""
    outs = []
    for i in range(2):
        torch.manual_seed(1234 + i)  # global RNG state must not leak into the method
        method = cls(conformance_context(workdir / str(i), seed=7), cls.smoke)
        results = run_steps(method, 2)
        outs.append(([r.metrics for r in results], [[s.spec for s in r.subnets] for r in results], method.best().spec))
    assert outs[0] == outs[1]


def check_state_dict_round_trip_resumes_exactly(cls: MethodClass, workdir: Path) -> None:
    """A state_dict saved with torch.save and loaded with ``weights_only=True`` resumes exactly."""
    a = cls(conformance_context(workdir / "a", seed=3), cls.smoke)
    a.step()
    state = copy.deepcopy(a.state_dict())
    # Save/load through torch.save with weights_only=True, as checkpoints are stored.
    torch.save(state, workdir / "state.pt")
    state = safe_load(workdir / "state.pt", "method state")
    b = cls(conformance_context(workdir / "b", seed=3), cls.smoke)
    b.load_state_dict(state)
    if a.done:
        assert b.done
        return
    ra, rb = a.step(), b.step()
    assert ra.metrics == rb.metrics
    assert [s.spec for s in ra.subnets] == [s.spec for s in rb.subnets]


def check_finalize_reports_true_macs(cls: MethodClass, workdir: Path) -> None:
    """finalize(method) leaves the caller's RNG alone and returns weights matching the spec, its true
    MACs and finite test, robust and latency figures."""
    ctx = conformance_context(workdir, kd_weight=0.9)
    torch.manual_seed(4321)
    caller_rng = torch.get_rng_state()
    method = cls(ctx, cls.smoke)
    method.run(max_steps=2)
    final = finalize(method, progress=False)
    # Search and fine-tune draw from their own seeded generators, never the caller's stream.
    assert torch.equal(torch.get_rng_state(), caller_rng)
    rec = final.record
    assert rec.macs == models.macs(rec.spec, ctx.input_size)
    for key in ("test_top1", "test_top5", "robust_top1", "latency_ms_b1_p50"):
        assert key in rec.metrics and math.isfinite(rec.metrics[key]), key
    net = models.build(rec.spec)
    net.load_state_dict(final.state_dict)  # strict: the weights match the spec exactly


CHECKS = (
    check_specs_valid_finite_and_in_budget,
    check_same_seed_same_result,
    check_state_dict_round_trip_resumes_exactly,
    check_finalize_reports_true_macs,
)


def check_method(cls: MethodClass, workdir: str | Path) -> None:
    """Run every check of the contract, each in its own subdirectory of ``workdir``."""
    for check in CHECKS:
        sub = Path(workdir) / check.__name__
        sub.mkdir(parents=True, exist_ok=True)
        check(cls, sub)
