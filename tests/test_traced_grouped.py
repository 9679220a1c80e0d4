"""Grouped convs in a traced user network: the channel groups that feed or leave a conv with G
groups are tiled (width a multiple of G, the same count kept in each of G blocks), counted
exactly, transferred block by block, and every method that picks channels keeps per block.

The network (written by the test): a concatenation, then a ResNeXt-style residual block whose
3x3 conv has 4 groups (with a bias) and whose 1x1 restore conv has 2, so the residual stream is
tiled by 2 and the groups between the two grouped convs by lcm(4, 2) = 4.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rayprune import models
from rayprune.engine.train import TrainConfig
from rayprune.grid import TargetWindow
from rayprune.methods import get_method
from rayprune.methods._baseline import keep_without, removal_order
from rayprune.methods.ast_convergence import calibrate_to_target, rank_channels
from rayprune.methods.base import Budget
from rayprune.methods.sp import MaskedSupernet
from rayprune.models.tiles import completed_removals, first_channels, interleaved_from_last, per_block_prefix
from rayprune.models.traced import with_metadata_of
from rayprune.models.transfer import extract_subnet, write_back, zero_dropped
from rayprune.testing import tiny_context
from rayprune.testing.bad_input import refused

SIZE = 16

NET = """
import torch
from torch import nn


def conv_bn(cin, cout, kernel=3, stride=1, groups=1, relu=True, bias=False):
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), *([nn.ReLU()] if relu else []))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.reduce = conv_bn(width, 16, 1)
        self.grouped = conv_bn(16, 16, 3, groups=4, bias=True)
        self.restore = conv_bn(16, width, 1, groups=2, relu=False)

    def forward(self, x):
        return torch.relu(x + self.restore(self.grouped(self.reduce(x))))


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a, self.b = conv_bn(8, 8, 1), conv_bn(8, 8, 3)
        self.join = conv_bn(16, 24, 1)
        self.block = Block(24)
        self.down = conv_bn(24, 32, 3, stride=2)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.block(self.join(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.down(x), 1), 1))


def net(num_classes=10):
    return Net(num_classes)


class CatIntoGrouped(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(3, 8)
        self.grouped = conv_bn(16, 16, groups=4)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.grouped(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def cat_into_grouped(num_classes=10):
    return CatIntoGrouped(num_classes)
"""

WIDTHS = {"stem.0": 8, "a.0": 8, "b.0": 8, "join.0": 24, "block.reduce.0": 16, "block.grouped.0": 16, "down.0": 32}
DIVISORS = [1, 1, 1, 2, 4, 4, 1]
TILED = {"join.0": 2, "block.reduce.0": 4, "block.grouped.0": 4}


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("user") / "grouped_net.py"
    file.write_text(NET)
    return file


@pytest.fixture(scope="module")
def spec(user_file):
    return models.full_spec(f"{user_file}:net", num_classes=4, input_size=SIZE)


def counted(spec):
    """(MACs, params) of the built net: FlopCounterMode plus the bias terms it omits, and numel."""
    with torch.device("meta"):
        net = models.build(spec).eval()
        x = torch.empty(1, 3, SIZE, SIZE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        assert tuple(net(x).shape) == (1, spec["num_classes"])
    bias = sum(layer.bias_macs for layer in models.layers(spec, SIZE))
    return counter.get_total_flops() // 2 + bias, sum(p.numel() for p in net.parameters())


def blocks_of(idx, width, tiles):
    return torch.bincount(idx // (width // tiles), minlength=tiles).tolist()


def assert_tiled(spec, keep):
    """Every tiled group keeps the same count in each block (so its width is a multiple of G)."""
    for name, tiles in TILED.items():
        counts = blocks_of(keep[name], WIDTHS[name], tiles)
        assert len(set(counts)) == 1 and counts[0] >= 1, (name, counts)
        assert spec["widths"][name] % tiles == 0


def randomised(spec, seed):
    """A built net with random weights and BN statistics (so a misaligned channel shows)."""
    net = models.build(spec, seed=seed).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def assert_subnet_computes_as_zeroed(spec, state, keep):
    """The extracted subnet (built, strictly loaded) computes what the full net computes with
    the dropped channels zeroed (eval mode)."""
    sub_spec, sub_state = extract_subnet(spec, state, keep)
    sub = models.build(sub_spec).eval()
    sub.load_state_dict(sub_state, strict=True)
    zeroed = with_metadata_of(state)
    zeroed.update({k: v.clone() for k, v in state.items()})
    zero_dropped(spec, zeroed, keep)
    full = models.build(spec).eval()
    full.load_state_dict(zeroed)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sub(x), full(x), rtol=1e-4, atol=1e-5)
    return sub_spec, sub_state


# -- derivation and exact counts ------------------------------------------------------------------


def test_grouped_convs_tile_their_groups(spec):
    groups = models.channel_groups(spec)
    assert spec["widths"] == WIDTHS
    assert [g.divisor for g in groups] == DIVISORS
    assert {g.name: g.tiles for g in groups if g.tiles > 1} == TILED
    assert [g.kind for g in groups].count("residual") == 1  # join.0: the join and the restore conv, tied by the add
    axes = models.tensor_axes(spec)
    assert axes["join.0.weight"] == ("join.0", "a.0+b.0", None, None)  # the concatenation, in order
    assert axes["block.grouped.0.weight"] == ("block.grouped.0", "block.reduce.0/4", None, None)
    assert axes["block.grouped.0.bias"] == ("block.grouped.0",)
    assert axes["block.restore.0.weight"] == ("join.0", "block.grouped.0/2", None, None)


def test_full_and_pruned_counts_are_exact(spec):
    assert counted(spec) == (models.macs(spec, SIZE), models.params(spec))
    by_hand = {"stem.0": 5, "a.0": 3, "b.0": 7, "join.0": 10, "block.reduce.0": 4, "block.grouped.0": 12, "down.0": 9}
    pruned = models.with_widths(spec, by_hand)
    assert counted(pruned) == (models.macs(pruned, SIZE), models.params(pruned))
    # grouped conv: 3*3 * (4/4 in per group) * 12 out * 16*16 positions + its bias, 12 * 256
    grouped = next(row for row in models.layers(pruned, SIZE) if row.name == "block.grouped.0")
    assert (grouped.groups, grouped.macs, grouped.params) == (4, 9 * 1 * 12 * 256 + 12 * 256, 9 * 12 + 12)
    rng = random.Random(0)
    for _ in range(3):
        widths = {g.name: rng.randint(1, g.width // g.divisor) * g.divisor for g in models.channel_groups(spec)}
        pruned = models.with_widths(spec, widths)
        assert counted(pruned) == (models.macs(pruned, SIZE), models.params(pruned))


def test_a_concatenation_into_a_grouped_conv_keeps_its_channels_whole(user_file):
    # the conv's 4 blocks would each mix a.0's and b.0's channels: no divisor per group expresses that
    spec = models.full_spec(f"{user_file}:cat_into_grouped", num_classes=4, input_size=SIZE)
    assert spec["widths"] == {"grouped.0": 16}  # its output is tiled; the two groups feeding it are kept
    assert models.tensor_axes(spec)["grouped.0.weight"] == ("grouped.0", None, None, None)
    pruned = models.with_widths(spec, {"grouped.0": 8})
    assert counted(pruned) == (models.macs(pruned, SIZE), models.params(pruned))


def test_inspect_refuses_a_spec_file_with_such_a_width_in_one_line(capsys, tmp_path, spec):
    file = tmp_path / "spec.json"
    file.write_text(json.dumps({**spec, "widths": {**spec["widths"], "block.grouped.0": 6}}))
    refused(capsys, tmp_path, ["inspect", str(file)], "'block.grouped.0'", "not a multiple of its divisor 4")


def test_a_width_not_a_multiple_of_the_divisor_is_one_spec_error(spec):
    with pytest.raises(models.SpecError) as err:
        models.with_widths(spec, {"block.grouped.0": 6})
    assert str(err.value).count("\n") == 0
    assert "'block.grouped.0'" in str(err.value) and "divisor 4" in str(err.value)
    bad = {**spec, "widths": {**spec["widths"], "join.0": 9}}
    with pytest.raises(models.SpecError) as err:
        models.validate(bad)
    assert str(err.value) == (
        "channel group 'join.0': width 9 is not a multiple of its divisor 2 (the group count of the grouped "
        "conv it meets); use a multiple of 2"
    )


# -- transfer ---------------------------------------------------------------------------------------


def test_transfer_round_trip_keeps_each_blocks_channels(spec):
    state = randomised(spec, 0).state_dict()
    keep = {
        "join.0": torch.tensor([0, 2, 4, 13, 17, 23]),  # 3 of each block of 12
        "block.reduce.0": torch.tensor([0, 5, 10, 15]),  # 1 of each block of 4
        "block.grouped.0": torch.tensor([1, 3, 4, 6, 9, 10, 12, 15]),  # 2 of each block of 4
        "b.0": torch.tensor([1, 6]),
    }
    sub_spec, sub_state = assert_subnet_computes_as_zeroed(spec, state, keep)
    assert [sub_spec["widths"][k] for k in keep] == [6, 4, 8, 2]

    # block.grouped.0 (4 groups): output rows 1, 3 read block 0 of block.reduce.0, where only its
    # channel 0 is kept (offset 0); rows 4, 6 read block 1 (channel 5: offset 1); and so on.
    w = state["block.grouped.0.weight"]
    rows_cols = [(1, 0), (3, 0), (4, 1), (6, 1), (9, 2), (10, 2), (12, 3), (15, 3)]
    assert torch.equal(sub_state["block.grouped.0.weight"], torch.stack([w[r, [c]] for r, c in rows_cols]))
    # block.restore.0 (2 groups of 8 in, 12 out): join rows 0, 2, 4 read grouped's kept channels
    # 1, 3, 4, 6 of block 0; rows 13, 17, 23 read 9, 10, 12, 15 of block 1 (offsets 1, 2, 4, 7).
    w = state["block.restore.0.weight"]
    expected = torch.stack([w[r, [1, 3, 4, 6]] for r in (0, 2, 4)] + [w[r, [1, 2, 4, 7]] for r in (13, 17, 23)])
    assert torch.equal(sub_state["block.restore.0.weight"], expected)
    assert torch.equal(sub_state["block.grouped.0.bias"], state["block.grouped.0.bias"][keep["block.grouped.0"]])

    blank = with_metadata_of(state)
    blank.update({k: torch.zeros_like(v) for k, v in state.items()})
    write_back(spec, blank, keep, sub_state)
    _, again = extract_subnet(spec, blank, keep)
    for key, value in sub_state.items():
        assert torch.equal(again[key], value), key
    written = blank["block.restore.0.weight"]
    assert int((written != 0).sum()) == expected.numel()  # nothing outside the kept entries
    assert torch.equal(written[13, [1, 2, 4, 7]], state["block.restore.0.weight"][13, [1, 2, 4, 7]])


def test_transfer_runs_on_the_meta_device(spec):
    """Shapes only (how the coverage bench checks large nets): the blocked axes index on the CPU."""
    groups = models.channel_groups(spec)
    with torch.device("meta"):
        state = models.build(spec).state_dict()
    keep = {g.name: first_channels(g.width, g.width // 2 // g.divisor * g.divisor, g.tiles) for g in groups}
    _, sub_state = extract_subnet(spec, state, keep)
    assert sub_state["block.restore.0.weight"].is_meta
    assert sub_state["block.restore.0.weight"].shape == (12, 4, 1, 1)
    write_back(spec, state, keep, sub_state)


def test_a_keep_with_unequal_blocks_is_one_spec_error(spec):
    state = models.build(spec, seed=0).state_dict()
    with pytest.raises(models.SpecError) as err:
        extract_subnet(spec, state, {"block.grouped.0": torch.tensor([0, 1, 4, 8, 12, 13])})
    assert str(err.value) == (
        "channel group 'block.grouped.0': keeps [2, 1, 1, 2] channels in its 4 blocks of 4; "
        "a grouped conv needs the same count in every block (divisor 4)"
    )


# -- the per-block rule -----------------------------------------------------------------------------


def test_per_block_rules():
    order = torch.tensor([7, 6, 0, 5, 1, 4, 3, 2])  # most wanted first; 2 blocks of 4
    assert per_block_prefix(order, 4, 8, 2).tolist() == [0, 1, 6, 7]
    assert per_block_prefix(order, 3, 8, 1).tolist() == [0, 6, 7]  # one tile: the first 3
    assert first_channels(12, 6, 3).tolist() == [0, 1, 4, 5, 8, 9]
    # removal order: block 0 loses 1 and 0 before block 1 loses anything; only whole rounds go
    assert completed_removals([1, 0, 3, 6], 8, 2) == [1, 6]
    assert completed_removals([1, 0, 3], 8, 1) == [1, 0, 3]
    assert interleaved_from_last(8, 2, 4) == [3, 7, 2, 6]
    assert interleaved_from_last(8, 1, 5) == [7, 6, 5]


def test_ranked_removal_keeps_the_best_of_each_block(spec):
    importance = {g.name: torch.zeros(g.width, dtype=torch.float64) for g in models.channel_groups(spec)}
    importance["block.grouped.0"] = torch.tensor([float(i) for i in (0, 1, 2, 3, 9, 9, 9, 9, 8, 8, 8, 8, 7, 7, 7, 7)])
    mins = {name: 4 if name in TILED else 1 for name in importance}
    tiles = {g.name: g.tiles for g in models.channel_groups(spec)}
    order = [c for c in removal_order(importance, mins, tiles) if c[0] == "block.grouped.0"]
    assert len(order) == 12  # each block keeps its floor share of 1
    assert [i for _, i in order[:3]] == [0, 1, 2]  # block 0 has the lowest scores...
    # ...but nothing goes until every block gave one: block 1 (scores 9) gives its first tenth
    assert keep_without(spec, order[:9])["block.grouped.0"].numel() == 16
    assert keep_without(spec, order[:10])["block.grouped.0"].tolist() == [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15]
    assert keep_without(spec, order)["block.grouped.0"].tolist() == [3, 7, 11, 15]  # the best of each block


def test_ast_calibration_keeps_per_block(spec):
    groups = models.channel_groups(spec)
    alpha = {g.name: torch.randn(g.width, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(groups)}
    budget = Budget(flops_target=0.5)
    drawn = calibrate_to_target(
        spec,
        rank_channels(alpha, None, 0.0),
        {g.name: 0.6 for g in groups},
        budget.min_widths(spec),
        {g.name: g.divisor for g in groups},
        budget.target_macs(spec, SIZE),
        0.9,
        SIZE,
        {g.name: g.tiles for g in groups},
    )
    sub_spec = models.with_widths(spec, {g: int(k.numel()) for g, k in drawn.keep.items()})
    assert_tiled(sub_spec, drawn.keep)
    assert drawn.in_window and drawn.macs == models.macs(sub_spec, SIZE)
    # each block keeps its own most probable channels
    order = torch.argsort(alpha["block.grouped.0"].double(), descending=True, stable=True)
    n = int(drawn.keep["block.grouped.0"].numel())
    assert drawn.keep["block.grouped.0"].tolist() == per_block_prefix(order, n, 16, 4).tolist()


def test_sp_masks_compute_the_sliced_subnet(spec):
    net = randomised(spec, 2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    layout = models.family_of(spec).stage_split(spec, net)
    assert layout.boundary == ["join.0", "down.0"]  # the residual stream (tiled by 2) ends stage 0
    supernet = MaskedSupernet(spec, net, layout)
    widths = {**WIDTHS, "join.0": 12, "block.grouped.0": 8, "block.reduce.0": 4, "down.0": 20}
    supernet.set_widths(widths)
    keep = {g.name: first_channels(g.width, widths[g.name], g.tiles) for g in models.channel_groups(spec)}
    sub_spec, sub_state = extract_subnet(spec, state, keep)
    sub = models.build(sub_spec).eval()
    sub.load_state_dict(sub_state)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(net(x), sub(x), rtol=1e-4, atol=1e-5)
        stage0 = layout.stages[0](x)
    assert supernet.kept(stage0, "join.0", 12).shape[1] == 12
    assert torch.equal(supernet.kept(stage0, "join.0", 12), stage0[:, [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]])


# -- methods ------------------------------------------------------------------------------------


def test_l1_lands_in_its_window_and_inherits_per_block(tmp_path, spec):
    ctx = tiny_context(tmp_path, spec=spec, budget=0.5, n_train=64, n_test=16, finetune=TrainConfig(epochs=1))
    run = get_method("l1")(ctx, {"pretrain_epochs": 1, "bn_recal_batches": 1})
    run.run(max_steps=1)
    best = run.best()
    assert TargetWindow(ctx.budget.target_macs(spec, SIZE)).contains(best.macs), best.macs
    assert best.macs == models.macs(best.spec, SIZE)
    assert_tiled(best.spec, run.keep)
    assert best.spec["widths"]["block.grouped.0"] < 16 or best.spec["widths"]["join.0"] < 24  # tiled groups pruned
    _, inherited = assert_subnet_computes_as_zeroed(spec, run.full_state, run.keep)
    for key, value in run.initial_weights(best).items():
        assert torch.equal(value, inherited[key]), key


@pytest.mark.parametrize("allocation", [None, [1.0, 1.0]], ids=["draws", "allocated"])
def test_random_lands_in_its_window_with_multiples_of_the_divisor(tmp_path, spec, allocation):
    ctx = tiny_context(tmp_path, spec=spec, budget=0.5, n_train=32, n_test=16, finetune=TrainConfig(epochs=1))
    ctx = dataclasses.replace(ctx, budget=Budget(flops_target=0.5, allocation=allocation))
    run = get_method("random")(ctx, {"samples": 2, "eval_epochs": 1})
    run.run(max_steps=2)
    window = TargetWindow(ctx.budget.target_macs(spec, SIZE))
    for record in run.records:
        assert window.contains(record.macs), record.macs
        models.validate(record.spec)
        widths = record.spec["widths"]
        assert all(widths[name] % tiles == 0 for name, tiles in TILED.items()), widths
        keep = {g.name: first_channels(g.width, widths[g.name], g.tiles) for g in models.channel_groups(spec)}
        assert_subnet_computes_as_zeroed(spec, randomised(spec, 1).state_dict(), keep)
