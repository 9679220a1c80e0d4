"""The classic baselines: uniform bisection, L1/FPGM filter choice, global ranking, random sampling."""

from __future__ import annotations

import pytest
import torch

from rayprune import models
from rayprune.engine.train import TrainConfig
from rayprune.methods import Budget, get_method
from rayprune.methods._baseline import (
    filter_importance,
    fit_multiplier,
    fit_removals,
    fpgm_scores,
    keep_after,
    l1_scores,
    removal_order,
    scaled_widths,
)
from rayprune.methods.random_search import sample_feasible
from rayprune.testing import tiny_context


def widths_of(keep):
    return {g: int(idx.numel()) for g, idx in keep.items()}


def macs_with(spec, widths, input_size=None):
    return models.macs(models.with_widths(spec, widths), input_size)


# --------------------------------------------------------------------------------------------
# uniform
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, max_stage_prune", [(0.5, None), (0.3, None), (0.7, [0.2, 0.3, 0.3])])
def test_uniform_bisection_stops_one_channel_step_below_the_target(target, max_stage_prune):
    spec = models.full_spec("cifar_resnet:20")
    budget = Budget(flops_target=target, max_stage_prune=max_stage_prune)
    groups = models.channel_groups(spec)
    full, mins = {g.name: g.width for g in groups}, budget.min_widths(spec)
    t, t_over, widths = fit_multiplier(spec, full, mins, budget.target_macs(spec))
    over = scaled_widths(groups, full, mins, t_over)
    assert macs_with(spec, widths) <= budget.target_macs(spec) < macs_with(spec, over)
    assert 0 < t_over - t < 1e-9
    # The next multiplier step grows widths by at most one channel per group: within one step.
    assert all(0 <= over[g] - widths[g] <= 1 for g in widths) and over != widths
    assert all(widths[g] >= mins[g] for g in widths)
    # Uniform: every group of a stage shares the stage's width, unless clamped at its minimum.
    for stage in range(3):
        assert len({widths[g.name] for g in groups if g.stage == stage}) == 1


def test_scaled_widths_round_to_the_divisor_and_clamp():
    groups = [models.ChannelGroup("a", 32, 0, "inner", divisor=8), models.ChannelGroup("b", 32, 0, "inner")]
    full, mins = {"a": 32, "b": 32}, {"a": 8, "b": 12}
    assert scaled_widths(groups, full, mins, 0.5) == {"a": 16, "b": 16}
    assert scaled_widths(groups, full, mins, 0.1) == {"a": 8, "b": 12}  # never below the minimum
    assert scaled_widths(groups, full, mins, 0.65) == {"a": 24, "b": 21}  # 20.8 -> nearest multiple of 8
    assert scaled_widths(groups, full, mins, 1.0) == full


def test_uniform_keeps_full_net_at_target_one():
    spec = models.full_spec("cifar_resnet:tiny")
    full = {g.name: g.width for g in models.channel_groups(spec)}
    t, _, widths = fit_multiplier(spec, full, {g: 1 for g in full}, models.macs(spec))
    assert (t, widths) == (1.0, full)


# --------------------------------------------------------------------------------------------
# L1 / FPGM filter scores
# --------------------------------------------------------------------------------------------

ONE_LAYER = {"conv.weight": ("g", None, None, None), "bn.weight": ("g",)}


def conv_with_filters(rows):
    """A [C_out, 2, 1, 1] conv weight whose filters are the given 2-vectors."""
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 2, 1, 1)


def kept_after_one_removal(rows, score):
    state = {"conv.weight": conv_with_filters(rows), "bn.weight": torch.ones(len(rows))}
    imp = filter_importance(state, ONE_LAYER, score)
    order = removal_order(imp, {"g": len(rows) - 1})
    return [i for i in range(len(rows)) if ("g", i) not in order]


def test_l1_scores_and_layer_mean_normalisation_by_hand():
    weight = conv_with_filters([[4, 0], [-1, 0], [1, -2], [0, 2]])  # L1 norms 4, 1, 3, 2 (mean 2.5)
    assert l1_scores(weight).tolist() == [4, 1, 3, 2]
    imp = filter_importance({"conv.weight": weight, "bn.weight": torch.ones(4)}, ONE_LAYER, l1_scores)
    assert torch.allclose(imp["g"], torch.tensor([1.6, 0.4, 1.2, 0.8], dtype=torch.float64))


def test_fpgm_scores_are_distance_sums_by_hand():
    # Filters at 0, 1 and 3 on a line: distance sums 1+3, 1+2, 3+2.
    weight = conv_with_filters([[0, 0], [1, 0], [3, 0]])
    assert fpgm_scores(weight).tolist() == [4.0, 3.0, 5.0]


# Three large filters clustered together plus two small outliers: L1 drops the smallest filter
# (index 3), FPGM drops the cluster's centre (index 0), the one nearest the geometric median.
CLUSTER = [[5, 0], [5, 0.1], [5, -0.1], [0, 1], [0, -1.2]]


def test_l1_keeps_the_largest_norm_filters():
    assert kept_after_one_removal(CLUSTER, l1_scores) == [0, 1, 2, 4]


def test_fpgm_drops_the_filter_nearest_the_geometric_median_and_keeps_outliers():
    assert kept_after_one_removal(CLUSTER, fpgm_scores) == [1, 2, 3, 4]


def test_group_importance_averages_normalised_producers():
    # Two producers of one group at very different scales: normalisation makes them count equally.
    axes = {"a.weight": ("g", None, None, None), "b.weight": ("g", None, None, None)}
    state = {"a.weight": conv_with_filters([[100, 0], [300, 0]]), "b.weight": conv_with_filters([[3, 0], [1, 0]])}
    imp = filter_importance(state, axes, l1_scores)  # a: [0.5, 1.5], b: [1.5, 0.5]
    assert imp["g"].tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------------------------
# Global ranking under the budget
# --------------------------------------------------------------------------------------------


def test_global_ranking_respects_min_widths_budget_and_is_minimal():
    spec = models.full_spec("cifar_resnet:tiny", num_classes=4)
    budget = Budget(flops_target=0.4, max_stage_prune=[0.5, 0.6, 0.7])
    mins, target = budget.min_widths(spec), budget.target_macs(spec, 16)
    gen = torch.Generator().manual_seed(0)
    imp = {g.name: torch.rand(g.width, generator=gen, dtype=torch.float64) for g in models.channel_groups(spec)}
    imp["s2.b0.out"] -= 1.0  # globally least important: pruned first, down to its minimum width
    order = removal_order(imp, mins)
    keep = fit_removals(spec, order, target, 16)
    widths = widths_of(keep)
    assert macs_with(spec, widths, 16) <= target
    assert all(widths[g] >= mins[g] for g in widths)
    assert widths["s2.b0.out"] == mins["s2.b0.out"] == 10  # ceil(32 * 0.3)
    removed = sum(g.width for g in models.channel_groups(spec)) - sum(widths.values())
    assert macs_with(spec, widths_of(keep_after(spec, order, removed - 1)), 16) > target  # fewest removals
    # Within a group, the kept channels are the most important ones.
    for g, idx in keep.items():
        dropped = sorted(set(range(len(imp[g]))) - set(idx.tolist()))
        if dropped:
            assert imp[g][dropped].max() <= imp[g][idx].min()


def test_l1_with_teacher_keeps_largest_filters_and_inherits_weights(tmp_path):
    spec = models.full_spec("cifar_resnet:tiny", num_classes=4, shortcut="avgpool_conv")
    teacher = models.build(spec)
    with torch.no_grad():  # plant norms in the single producer of s0.b1.mid: filter i has norm ~ (i + 1)
        w = teacher.stages[0][1].conv1.weight
        w.copy_(w.sign() * torch.arange(1, 9, dtype=torch.float32).view(8, 1, 1, 1) / w[0].numel())
    ctx = tiny_context(
        tmp_path,
        spec=spec,
        budget=0.3,
        n_train=80,
        n_test=16,
        teacher=teacher,
        seed=1,
        finetune=TrainConfig(epochs=1, batch_size=16),
    )
    method = get_method("l1")(ctx, {"bn_recal_batches": 1})
    method.run()
    kept = method.keep["s0.b1.mid"].tolist()
    assert 1 <= len(kept) < 8 and kept == list(range(8 - len(kept), 8))
    rec = method.best()
    assert rec.macs <= ctx.budget.target_macs(spec, 16)
    init = method.initial_weights(rec)
    full_w = teacher.state_dict()["stages.0.1.conv1.weight"]
    assert torch.equal(init["stages.0.1.conv1.weight"], full_w[kept][:, method.keep["stem"]])
    models.build(rec.spec).load_state_dict(init)


# --------------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------------


def test_random_sampling_is_seeded_feasible_and_varied():
    spec = models.full_spec("cifar_resnet:20")
    budget = Budget(flops_target=0.5, max_stage_prune=[0.6, 0.6, 0.6])
    mins, target = budget.min_widths(spec), budget.target_macs(spec)
    draws = [sample_feasible(spec, mins, target, torch.Generator().manual_seed(s), 50) for s in range(6)]
    again = sample_feasible(spec, mins, target, torch.Generator().manual_seed(3), 50)
    assert again == draws[3]
    assert len({tuple(w.values()) for w, _, _ in draws}) == 6
    for widths, _, _ in draws:  # in the target window, like every method's reported subnet
        assert 0.9 * target <= macs_with(spec, widths) <= target and all(widths[g] >= mins[g] for g in widths)


def test_random_shrinks_when_rejection_keeps_failing():
    spec = models.full_spec("cifar_resnet:20")
    budget = Budget(flops_target=0.2, max_stage_prune=[0.6, 0.6, 0.6])  # floor is 0.16: draws rarely fit
    mins, target = budget.min_widths(spec), budget.target_macs(spec)
    widths, tries, shrunk = sample_feasible(spec, mins, target, torch.Generator().manual_seed(0), 1)
    assert (tries, shrunk) == (1, True)
    assert 0.9 * target <= macs_with(spec, widths) <= target and all(widths[g] >= mins[g] for g in widths)
