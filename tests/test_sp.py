"""SP: masked super-net == sliced subnet, FLOPs window, BN recalibration, Kendall tau, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayprune import models
from rayprune.engine.data import make_loader, synthetic_dataset
from rayprune.engine.train import TrainConfig, evaluate, fit
from rayprune.methods import Budget
from rayprune.methods.sp import (
    SP,
    MaskedSupernet,
    SearchError,
    WidthSpace,
    kendall_tau_b,
    proxy_rank_correlation,
    recalibrate_bn,
    stage_layout,
)
from rayprune.models.transfer import extract_subnet
from rayprune.testing import tiny_context, tiny_spec


def randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so a wrong mask position would show."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)


@pytest.mark.parametrize(
    "spec",
    [
        tiny_spec("option_a"),
        tiny_spec("avgpool_conv"),
        tiny_spec("conv_bn"),
        models.full_spec("mobilenet_v2:tiny", num_classes=4),
    ],
    ids=["resnet_option_a", "resnet_avgpool_conv", "resnet_conv_bn", "mobilenet_v2"],
)
@pytest.mark.slow
def test_masked_supernet_equals_extracted_subnet(spec):
    model = models.build(spec, seed=0)
    randomize_bn(model, 1)
    model.eval()
    net = MaskedSupernet(spec, model, stage_layout(spec, model))
    space = WidthSpace(spec, [r / 10 for r in range(1, 11)], {g: 1 for g in net.full}, (0, 1e12), 16)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):  # random widths, incl. stage inputs wider than the option-A outputs
        widths = space.widths(space.random(gen))
        subspec, substate = extract_subnet(spec, model.state_dict(), {g: torch.arange(w) for g, w in widths.items()})
        sub = models.build(subspec).eval()
        sub.load_state_dict(substate)
        net.set_widths(widths)
        with torch.no_grad():
            masked = model(x)
            layout = net.layout
            chained = x
            for stage in layout.stages:
                chained = stage(chained)
            chained = layout.head(chained)
            assert torch.allclose(masked, sub(x), atol=1e-5), (widths, (masked - sub(x)).abs().max())
            assert torch.allclose(chained, masked, atol=1e-6)


def test_kendall_tau_b_hand_values():
    # 6 pairs: 5 concordant, 1 discordant (indices 1, 2) -> (5 - 1) / 6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ties: pair (0,1) tied in x, pair (1,2) tied in y; the other 4 concordant -> 4 / sqrt(5 * 5)
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    # pair (0,1) is tied in both (counts in neither); (0,2) and (1,2) concordant -> 2 / sqrt(2 * 2)
    assert kendall_tau_b([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equally long"):
        kendall_tau_b([1, 2], [1, 2, 3])


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_window_sampler_hits_the_window_on_resnet20(target):
    spec = models.full_spec("cifar_resnet:20")
    budget = Budget(flops_target=target, max_stage_prune=[0.8, 0.8, 0.8])
    hi = budget.target_macs(spec)
    space = WidthSpace(spec, [r / 10 for r in range(1, 11)], budget.min_widths(spec), (0.97 * hi, hi), None)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        genes = space.sample(gen, retries=50)
        assert 0.97 * hi <= models.macs(models.with_widths(spec, space.widths(genes))) <= hi


def test_unreachable_window_fails_clearly():
    spec = tiny_spec()
    space = WidthSpace(spec, [1.0], {g.name: 1 for g in models.channel_groups(spec)}, (10, 20), 16)
    with pytest.raises(SearchError, match="flops_window_low"):
        space.sample(torch.Generator().manual_seed(0), retries=3)


def make_ctx(tmp_path, teacher=True, budget=0.5, spec=None, **kw):
    spec = spec or tiny_spec()
    return tiny_context(
        tmp_path,
        spec=spec,
        budget=budget,
        max_stage_prune=[0.7] * 3,
        teacher=models.build(spec, seed=5) if teacher else None,
        **kw,
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished smoke run with a larger population (shared by the tests below)."""
    ctx = make_ctx(tmp_path_factory.mktemp("sp"))
    method = SP(
        ctx,
        {**SP.smoke, "population": 10, "generations": 3, "parents": 4, "mutation_children": 5, "crossover_children": 5},
    )
    results = method.run()
    return ctx, method, results


@pytest.mark.slow
def test_search_reports_only_candidates_in_the_flops_window(searched):
    ctx, method, results = searched
    hi = ctx.budget.target_macs(ctx.spec, ctx.input_size)
    records = [r for res in results for r in res.subnets]
    assert len(records) >= 10 and len({r.key for r in records}) == len(records)  # each candidate once
    assert {r.source["origin"] for r in records} >= {"random", "mutation"}
    for rec in [*records, method.best()]:
        assert 0.97 * hi <= rec.macs <= hi, rec.macs
        assert 0.0 <= rec.metrics["val_top1"] <= 1.0 and math.isfinite(rec.metrics["proxy_loss"])
    best = max(records, key=lambda r: (r.metrics["val_top1"], -r.metrics["proxy_loss"]))
    assert method.best().metrics == best.metrics


@pytest.mark.slow
def test_proxy_evaluation_has_no_side_effects_and_is_repeatable(searched):
    _, method, _ = searched
    before = {k: v.clone() for k, v in method.net.model.state_dict().items()}
    widths = method.space.widths(method.space.sample(torch.Generator().manual_seed(1), 10))
    first = method.evaluate_widths(widths)
    assert method.evaluate_widths(widths) == first
    after = method.net.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_proxy_rank_correlation_reports_tau_over_in_window_archs(searched):
    ctx, method, _ = searched
    out = proxy_rank_correlation(method, n_archs=3, train_cfg=TrainConfig(epochs=1, batch_size=32, lr=0.05))
    hi = ctx.budget.target_macs(ctx.spec, ctx.input_size)
    assert out["n_archs"] == 3 and all(0.97 * hi <= a["macs"] <= hi for a in out["archs"])
    expected = kendall_tau_b([a["val_top1"] for a in out["archs"]], [a["real_top1"] for a in out["archs"]])
    assert out["kendall_tau"] == expected or (math.isnan(expected) and math.isnan(out["kendall_tau"]))


@pytest.mark.slow
def test_rank_check_is_reported_with_the_last_step_only(tmp_path):
    method = SP(make_ctx(tmp_path), {**SP.smoke, "rank_archs": 3, "rank_epochs": 1})
    results = method.run()
    assert all("kendall_tau" not in r.metrics for r in results[:-1])
    last = results[-1].metrics
    assert last["rank_archs"] == 3 and (-1.0 <= last["kendall_tau"] <= 1.0 or math.isnan(last["kendall_tau"]))


@pytest.mark.slow
def test_bn_recalibration_beats_stale_statistics():
    """A super-net trained at full and quarter width shares BN statistics that mostly fit the
    full net; at quarter width, recalibrated statistics must give a better accuracy."""
    train, test = synthetic_dataset(n_train=256, n_test=256, num_classes=4, size=16, seed=0)
    spec = tiny_spec("option_a")
    model = models.build(spec, seed=0)
    net = MaskedSupernet(spec, model, stage_layout(spec, model))
    narrow = {g: max(1, w // 4) for g, w in net.full.items()}

    def sandwich(m, x, y):
        net.set_widths(narrow)
        loss = F.cross_entropy(m(x), y)
        net.set_widths(None)  # the full path runs last, so it dominates the running stats
        return loss + F.cross_entropy(m(x), y)

    fit(model, train, TrainConfig(epochs=4, batch_size=32, lr=0.05), loss_fn=sandwich, progress=False)
    net.set_widths(narrow)
    stale = evaluate(model, test)["top1"]
    recalibrate_bn(model, (x for x, _ in make_loader(train, 64, train=False)))
    assert evaluate(model, test)["top1"] > stale + 0.2


def test_teacher_must_match_the_spec(tmp_path):
    ctx = make_ctx(tmp_path)
    ctx.teacher = models.build(models.full_spec("cifar_resnet:20", num_classes=4))
    with pytest.raises(ValueError, match=r"unpruned network of ctx.spec"):
        SP(ctx, SP.smoke)


@pytest.mark.slow
def test_external_teacher_mode_resumes_mid_stage(tmp_path):
    """Resume inside a stage (optimizer momentum saved) in the external-teacher mode."""
    hp = {**SP.smoke, "stage_epochs": 2, "teacher_mode": "external"}
    a = SP(make_ctx(tmp_path / "a"), hp)
    a.step()
    state = a.state_dict()
    assert state["optimizer"] is not None
    b = SP(make_ctx(tmp_path / "b"), hp)
    b.load_state_dict(state)
    assert a.step().metrics == b.step().metrics
    with pytest.raises(ValueError, match="different hyperparameters"):
        SP(make_ctx(tmp_path / "c"), SP.smoke).load_state_dict(state)


@pytest.mark.slow
def test_mobilenet_v2_runs_through_all_phases(tmp_path):
    ctx = make_ctx(tmp_path, spec=models.full_spec("mobilenet_v2:tiny", num_classes=4), budget=0.6)
    method = SP(ctx, {**SP.smoke, "generations": 1})
    results = method.run()
    assert [r.metrics.get("stage") for r in results[:4]] == [0, 1, 2, 3]  # 3 resolutions + the head stage
    hi = ctx.budget.target_macs(ctx.spec, ctx.input_size)
    assert results[-1].subnets and all(0.97 * hi <= r.macs <= hi for r in results[-1].subnets)
