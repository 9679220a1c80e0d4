"""Budgets that always matter: a per-stage allocation, scaled by one scalar fitted on the exact MACs
into the target window, decides how much each stage of an l1/fpgm/random subnet is pruned."""

from __future__ import annotations

import itertools

import pytest
import torch

from rayprune import models
from rayprune.engine.data import synthetic_dataset
from rayprune.engine.train import TrainConfig
from rayprune.grid import TargetWindow
from rayprune.methods import Budget, RunContext, get_method
from rayprune.methods._baseline import (
    RemovalQueue,
    filter_importance,
    fit_into_window,
    fit_removals,
    keep_after,
    l1_scores,
    macs_without,
    merge_queues,
    removal_order,
    stage_queues,
    widths_of,
)
from rayprune.methods.base import stage_rates
from rayprune.methods.random_search import sample_allocated
from rayprune.models.base import SpecError

QUICKSTART_SPEC = models.full_spec("cifar_resnet:tiny", num_classes=10, shortcut="avgpool_conv")
ALLOCATIONS = [[1.0, 1.0, 1.0], [0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]


def l1_subnet(spec, budget, input_size):
    """The widths l1 keeps under ``budget`` (seeded-init weights stand in for a trained net)."""
    importance = filter_importance(models.build(spec, seed=0).state_dict(), models.tensor_axes(spec), l1_scores)
    target = budget.target_macs(spec, input_size)
    queues = stage_queues(importance, models.channel_groups(spec), budget.min_widths(spec), budget.stage_shares(spec))
    keep, _ = fit_into_window(spec, merge_queues(queues), target, TargetWindow(target).low_macs, input_size)
    return widths_of(keep)


def random_subnet(spec, budget, input_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mins, target = budget.min_widths(spec), budget.target_macs(spec, input_size)
    return sample_allocated(spec, mins, budget.stage_shares(spec), target, gen, input_size)[0]


# --------------------------------------------------------------------------------------------
# The budget
# --------------------------------------------------------------------------------------------


def test_the_allocation_is_normalised_and_checked_against_the_model():
    assert Budget(flops_target=0.5, allocation=[2, 1, 1]).stage_shares(QUICKSTART_SPEC) == [0.5, 0.25, 0.25]
    assert Budget(flops_target=0.5).stage_shares(QUICKSTART_SPEC) is None
    with pytest.raises(SpecError, match="allocation needs 3 entries"):
        Budget(flops_target=0.5, allocation=[1, 1]).stage_shares(QUICKSTART_SPEC)
    with pytest.raises(ValueError, match=r"allocation\[1\] must be a finite share >= 0, got -0.5"):
        Budget(flops_target=0.5, allocation=[1, -0.5, 1])
    with pytest.raises(ValueError, match="allocation needs at least one positive share"):
        Budget(flops_target=0.5, allocation=[0, 0, 0])


def test_realised_stage_rates_count_kept_channels_per_stage():
    # stage 0: stem 8 + two mids 8 = 24 channels; stage 1: 3 x 16; stage 2: 3 x 32
    spec = models.with_widths(QUICKSTART_SPEC, {"stem": 4, "s0.b0.mid": 8, "s1.b0.out": 8, "s2.b1.mid": 24})
    assert stage_rates(QUICKSTART_SPEC, spec) == [1 - 20 / 24, 1 - 40 / 48, 1 - 88 / 96]
    assert stage_rates(QUICKSTART_SPEC, QUICKSTART_SPEC) == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# The fit: one scalar, bisected on the exact MACs, lands the subnet in the window
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant, input_size", [("tiny", 8), ("20", 32)])
def test_every_allocated_subnet_lands_in_its_window(variant, input_size):
    spec = models.full_spec(f"cifar_resnet:{variant}", num_classes=10, shortcut="avgpool_conv")
    allocations = [*ALLOCATIONS, [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    for target, (i, allocation) in itertools.product([0.3, 0.5, 0.7], enumerate(allocations)):
        rates = [0.8, 0.8, 0.8] if i % 2 else None
        budget = Budget(flops_target=target, max_stage_prune=rates, allocation=allocation)
        window, mins = TargetWindow(budget.target_macs(spec, input_size)), budget.min_widths(spec)
        for widths in (l1_subnet(spec, budget, input_size), random_subnet(spec, budget, input_size)):
            macs = models.macs(models.with_widths(spec, widths), input_size)
            assert window.contains(macs), (variant, target, allocation, rates, macs / window.target_macs)
            assert all(widths[g] >= mins[g] for g in mins)  # the maximum rates stay hard floors


def l1_rates(budget):
    return stage_rates(QUICKSTART_SPEC, models.with_widths(QUICKSTART_SPEC, l1_subnet(QUICKSTART_SPEC, budget, 8)))


def test_the_allocation_decides_how_much_each_stage_is_pruned():
    first, second, third = (
        l1_rates(Budget(flops_target=0.7, allocation=a)) for a in ([1, 0, 0], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6])
    )
    assert first[0] > 0 and first[1:] == [0.0, 0.0]  # only stage 0 is cut while it can be
    assert second[0] > second[2] and third[2] > third[0]
    capped = l1_rates(Budget(flops_target=0.5, max_stage_prune=[0.5, 0.9, 0.9], allocation=[1, 0, 0]))
    assert capped[0] <= 0.5 and capped[1] + capped[2] > 0  # stage 0 stops at its maximum rate; the rest follow


def test_the_scale_is_the_smallest_that_meets_the_target():
    queues = [
        RemovalQueue([("s0.b0.mid", i) for i in range(6)], 8, 1.5),
        RemovalQueue([("s2.b0.mid", i) for i in range(28)], 32, 0.5),
    ]
    merged = merge_queues(queues)
    assert [k for _, k in merged] == sorted(k for _, k in merged)
    # s2's j-th channel goes at k = j / (32 * 0.5) = j / 16, s0's at j / (8 * 1.5) = j / 12
    assert merged[:3] == [(("s2.b0.mid", 0), 1 / 16), (("s0.b0.mid", 0), 1 / 12), (("s2.b0.mid", 1), 2 / 16)]
    target = int(0.9 * models.macs(QUICKSTART_SPEC, 8))
    keep, scale = fit_into_window(QUICKSTART_SPEC, merged, target, 0.0, 8)
    widths = widths_of(keep)
    n = (8 - widths["s0.b0.mid"]) + (32 - widths["s2.b0.mid"])
    order = [c for c, _ in merged]
    assert n > 1 and scale == merged[n - 1][1]
    assert all(torch.equal(keep[g], idx) for g, idx in keep_after(QUICKSTART_SPEC, order, n).items())
    assert macs_without(QUICKSTART_SPEC, order[:n], 8) <= target < macs_without(QUICKSTART_SPEC, order[: n - 1], 8)


def test_a_channel_too_big_for_the_window_is_kept_and_smaller_ones_go_instead():
    full = models.macs(QUICKSTART_SPEC, 8)  # one stem channel weighs 5.4% of it
    merged = [(("stem", 0), 1.0)] + [(("s2.b0.out", i), 2.0 + i) for i in range(10)]
    target, low = int(0.97 * full), 0.96 * full
    keep, scale = fit_into_window(QUICKSTART_SPEC, merged, target, low, 8)
    widths = widths_of(keep)
    assert widths["stem"] == 8 and widths["s2.b0.out"] < 32
    assert low <= models.macs(models.with_widths(QUICKSTART_SPEC, widths), 8) <= target
    assert scale == 2.0 + (32 - widths["s2.b0.out"]) - 1
    # nothing fits the window: the fewest leading channels stand, below it (the record says so)
    keep, _ = fit_into_window(QUICKSTART_SPEC, merged[:1], target, low, 8)
    assert widths_of(keep)["stem"] == 7


# --------------------------------------------------------------------------------------------
# Different allocations, different subnets: l1 and random on the quickstart model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_l1_and_random_choose_a_different_subnet_under_each_allocation(target):
    for choose in (l1_subnet, random_subnet):
        subnets = [
            models.with_widths(QUICKSTART_SPEC, choose(QUICKSTART_SPEC, Budget(flops_target=target, allocation=a), 8))
            for a in ALLOCATIONS
        ]
        assert len({models.spec_hash(s) for s in subnets}) == len(ALLOCATIONS), choose.__name__


def quickstart_context(tmp_path, target, allocation, **fields):
    train, test = synthetic_dataset(n_train=100, n_test=10, num_classes=10, size=8, seed=0)
    return RunContext(
        spec=QUICKSTART_SPEC,
        train=train,
        test=test,
        budget=Budget(flops_target=target, max_stage_prune=[0.8, 0.8, 0.8], allocation=allocation),
        device="cpu",
        workdir=tmp_path,
        finetune=TrainConfig(epochs=1, batch_size=64, lr=0.05),
        input_size=8,
        progress=False,
        **fields,
    )


@pytest.mark.slow
def test_the_methods_report_their_allocated_subnets(tmp_path):
    teacher = models.build(QUICKSTART_SPEC, seed=0)
    window = TargetWindow(Budget(flops_target=0.5).target_macs(QUICKSTART_SPEC, 8))
    records = {}
    for name, hparams, fields in [
        ("l1", {"bn_recal_batches": 1}, {"teacher": teacher}),
        ("random", {"samples": 1, "eval_epochs": 1}, {}),
    ]:
        for i, allocation in enumerate(ALLOCATIONS[1:3]):
            method = get_method(name)(quickstart_context(tmp_path / name, 0.5, allocation, **fields), hparams)
            method.step()
            records[name, i] = method.best()
        assert records[name, 0].key != records[name, 1].key, name
    assert all(window.contains(r.macs) and r.source["alloc_scale"] > 0 for r in records.values())
    assert records["l1", 0].source["selection"] == "stage_rank"
    # l1's subnet is what its stage ranking of the teacher's filters keeps
    budget = Budget(flops_target=0.5, max_stage_prune=[0.8, 0.8, 0.8], allocation=ALLOCATIONS[1])
    assert records["l1", 0].spec == models.with_widths(QUICKSTART_SPEC, l1_subnet(QUICKSTART_SPEC, budget, 8))


@pytest.mark.slow
def test_without_an_allocation_l1_ranks_globally(tmp_path):
    budget = Budget(flops_target=0.5, max_stage_prune=[0.8, 0.8, 0.8])
    importance = filter_importance(
        models.build(QUICKSTART_SPEC, seed=0).state_dict(), models.tensor_axes(QUICKSTART_SPEC), l1_scores
    )
    order = removal_order(importance, budget.min_widths(QUICKSTART_SPEC))
    expected = fit_removals(QUICKSTART_SPEC, order, budget.target_macs(QUICKSTART_SPEC, 8), 8)
    ctx = quickstart_context(tmp_path, 0.5, None, teacher=models.build(QUICKSTART_SPEC, seed=0))
    method = get_method("l1")(ctx, {"bn_recal_batches": 1})
    method.step()
    assert method.best().source == {"selection": "global_rank"}
    assert method.best().spec == models.with_widths(QUICKSTART_SPEC, widths_of(expected))


def test_what_optuna_chooses_per_method():
    uses = {name: get_method(name).budget_use for name in ("ast", "tas", "sp", "uniform", "l1", "fpgm", "random")}
    assert uses == {
        "ast": "max_rates",
        "tas": "max_rates",
        "sp": "max_rates",
        "uniform": "target",
        "l1": "allocation",
        "fpgm": "allocation",
        "random": "allocation",
    }
