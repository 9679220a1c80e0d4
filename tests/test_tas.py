"""TAS: search space, expected-FLOPs relaxation, schedules, genotypes and the cost loss.

Reference numbers are computed with the TAS reference code (D-X-Y/AutoDL-Projects).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from rayprune import models
from rayprune.engine.data import synthetic_dataset
from rayprune.engine.train import TrainConfig
from rayprune.methods import Budget, RunContext, get_method, within_budget
from rayprune.methods.tas import cost_loss, tau_at
from rayprune.methods.tas_supernet import (
    DEPTH_RULES,
    SearchResNet,
    channel_interp,
    depth_candidates,
    imagenet_depth_candidates,
    shrink_to_budget,
    width_candidates,
    zero_pad_add,
)
from rayprune.models import SpecError
from rayprune.models.base import get_path


def search_net(variant: str, num_classes: int = 10, **kw) -> SearchResNet:
    torch.manual_seed(0)
    return SearchResNet(models.full_spec(f"cifar_resnet:{variant}", num_classes=num_classes), **kw)


def set_argmax(net: SearchResNet, width_idx: list[int], depth_idx: list[int]) -> None:
    with torch.no_grad():
        net.width_logits.zero_()
        net.depth_logits.zero_()
        for r, i in enumerate(width_idx):
            net.width_logits[r, i] = 1.0
        for s, i in enumerate(depth_idx):
            net.depth_logits[s, i] = 1.0


# -- search space ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels, expected",
    [
        (16, (4, 6, 8, 9, 11, 12, 14, 16)),
        (32, (9, 12, 16, 19, 22, 25, 28, 32)),
        (64, (19, 25, 32, 38, 44, 51, 57, 64)),
        (128, (38, 51, 64, 76, 89, 102, 115, 128)),
        (256, (76, 102, 128, 153, 179, 204, 230, 256)),
        (512, (153, 204, 256, 307, 358, 409, 460, 512)),
        (1024, (307, 409, 512, 614, 716, 819, 921, 1024)),
        (2048, (614, 819, 1024, 1228, 1433, 1638, 1843, 2048)),
    ],
)
def test_width_candidates_match_tas_table(channels, expected):
    assert width_candidates(channels) == expected


def test_width_candidates_respect_a_floor_and_never_come_back_empty():
    assert width_candidates(16, min_width=math.ceil(16 * (1 - 0.5))) == (8, 9, 11, 12, 14, 16)
    assert width_candidates(8) == (2, 3, 4, 5, 6, 7, 8)  # duplicates merged: 7 candidates
    assert width_candidates(16, ratios=(0.3,), min_width=10) == (16,)


def test_depth_candidates_cifar_and_imagenet():
    assert depth_candidates(2) == (1, 2) and depth_candidates(3) == (1, 2, 3)
    assert depth_candidates(5) == (1, 3, 5)  # ResNet-32
    assert depth_candidates(9) == (1, 3, 5, 7, 9)  # ResNet-56
    assert depth_candidates(18) == (1, 3, 5, 7, 9, 11, 13, 15, 17, 18)  # ResNet-110 / 164
    assert imagenet_depth_candidates([3, 4, 6, 3]) == [(1, 2, 3), (1, 2, 4), (2, 4, 6), (1, 2, 3)]  # ResNet-50
    assert imagenet_depth_candidates([2, 2, 2, 2]) == [(1, 2)] * 4  # ResNet-18


def test_search_net_rows_and_weights_match_the_reference_super_net():
    net = search_net("56")
    assert len(net.width_rows) == 55 and net.depth_rows == [(1, 3, 5, 7, 9)] * 3
    # Reference super-net: 873,743 params = ours + 55x8 + 3x5 arch logits + the per-candidate BNs
    # the reference also builds on the two stride-2 shortcut convs (2*(163 + 330)); we have none there.
    weights = sum(p.numel() for p in net.weight_parameters())
    assert weights + 55 * 8 + 3 * 5 + 2 * (163 + 330) == 873_743


def test_stage_rates_remove_width_candidates_below_the_floor():
    spec = models.full_spec("cifar_resnet:20")
    net = SearchResNet(spec, max_stage_prune=[0.0, 0.5, 0.25])
    stage_of_row = [0] + [info.stage for info in models.cifar_resnet.iter_blocks(spec) for _ in range(2)]
    for row, stage in zip(net.width_rows, stage_of_row, strict=True):
        full = row[-1]
        assert min(row) == min(
            c for c in width_candidates(full) if c >= math.ceil(full * (1 - [0.0, 0.5, 0.25][stage]))
        )
    assert net.width_rows[0] == (16,)  # stage 0 may not be pruned at all


# -- relaxation, schedules, losses -----------------------------------------------------------


@pytest.mark.parametrize(
    "variant, classes, expected", [("20", 10, 10.832545), ("32", 10, 16.548912), ("20", 100, 10.836257)]
)
def test_expected_macs_with_equal_logits_match_reference(variant, classes, expected):
    net = search_net(variant, classes)
    with torch.no_grad():
        net.width_logits.zero_()
        net.depth_logits.zero_()
    assert float(net.expected_macs().detach()) / 1e6 == pytest.approx(expected, abs=1e-6)


def test_tau_schedules():
    values = [tau_at(e, 600) for e in (0, 150, 300, 450)]
    assert [round(v, 4) for v in values] == [5.0, 4.2824, 2.55, 0.8176]
    assert tau_at(599, 600) > 0.1
    assert tau_at(300, 600, 10.0, 0.1, "linear") == pytest.approx(5.05)


def test_cost_loss_branches():
    e = torch.tensor(2e6)
    up, down = -math.log(2.0), math.log(2.0)
    # code form: target 50, tolerance 0.05 of max 100 -> push down above 50, up below 45.
    assert float(cost_loss(e, 51, 50, 100, 0.05, "code")) == pytest.approx(down)
    assert float(cost_loss(e, 48, 50, 100, 0.05, "code")) == 0.0
    assert float(cost_loss(e, 44, 50, 100, 0.05, "code")) == pytest.approx(up)
    # paper form: symmetric 5% around the target.
    assert float(cost_loss(e, 52, 50, 100, 0.05, "paper")) == 0.0
    assert float(cost_loss(e, 53, 50, 100, 0.05, "paper")) == pytest.approx(down)
    assert float(cost_loss(e, 47, 50, 100, 0.05, "paper")) == pytest.approx(up)


def test_cost_loss_moves_the_architecture_toward_the_target():
    net = SearchResNet(models.full_spec("cifar_resnet:tiny", num_classes=4), input_size=16)
    full = models.macs(net.spec, 16)
    opt = torch.optim.Adam(net.arch_parameters(), lr=0.1, betas=(0.5, 0.999))

    def arch_steps(target: float, reached) -> list[float]:
        """Cost-loss-only arch steps (at most 10) until ``reached(argmax genotype MACs)``."""
        trace = []
        for _ in range(10):
            current = models.macs(net.genotype(), 16)
            if reached(current):
                break
            expected = net.expected_macs()
            opt.zero_grad()
            cost_loss(expected, current, target * full, full).backward()
            opt.step()
            trace.append(float(expected.detach()))
        assert reached(models.macs(net.genotype(), 16)), trace
        return trace

    set_argmax(net, [len(r) - 1 for r in net.width_rows], [len(d) - 1 for d in net.depth_rows])  # the full net
    down = arch_steps(0.3, lambda macs: macs <= 0.3 * full)
    assert len(down) >= 2 and all(b < a for a, b in itertools.pairwise(down))
    up = arch_steps(0.9, lambda macs: macs >= 0.85 * full)  # now far below: the loss pushes back up
    assert len(up) >= 2 and all(b > a for a, b in itertools.pairwise(up))


# -- forward pieces --------------------------------------------------------------------------


def test_channel_interp_is_adaptive_avg_pool_over_channels():
    x = torch.randn(2, 11, 3, 3)
    for c in (4, 11, 16):
        assert torch.allclose(channel_interp(x, c), F.adaptive_avg_pool3d(x, (c, 3, 3)), atol=1e-6)


def test_zero_pad_add_adds_the_narrow_tensor_onto_the_first_channels():
    a, b = torch.ones(1, 4, 2, 2), 2 * torch.ones(1, 2, 2, 2)
    out = zero_pad_add(a, b)
    assert out.shape == (1, 4, 2, 2)
    assert out[:, :2].eq(3).all() and out[:, 2:].eq(1).all()
    assert torch.equal(zero_pad_add(b, a), out)


def test_sample_mixes_two_valid_candidates_and_gradients_reach_every_logit_row():
    net = SearchResNet(
        models.full_spec("cifar_resnet:tiny", num_classes=4), input_size=16, max_stage_prune=[0.0, 0.7, 0.7]
    )
    gen = torch.Generator().manual_seed(0)
    sample = net.sample(1.0, gen)
    for row, picks in zip(net.width_rows, sample.picks, strict=True):
        assert len(picks) == min(2, len(row)) and all(0 <= i < len(row) for i in picks)
    assert torch.allclose(sample.weights.sum(dim=1), torch.ones(len(net.width_rows)))
    net(torch.randn(4, 3, 16, 16), sample).logsumexp(dim=1).sum().backward()
    searched = torch.tensor([len(r) > 1 for r in net.width_rows])
    grads = net.width_logits.grad.abs().sum(dim=1)
    assert torch.isfinite(net.width_logits.grad).all() and (grads[searched] > 0).all()
    assert (net.depth_logits.grad.abs().sum(dim=1) > 0).all()


# -- genotypes -------------------------------------------------------------------------------


def counted_macs(net: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2


def test_genotype_from_a_hand_written_argmax_follows_the_depth_rule_and_counts_true_macs():
    net = search_net("20")
    width_idx = [r % 8 for r in range(19)]  # row r takes candidate r mod 8
    set_argmax(net, width_idx, [0, 2, 1])  # keep 1, 3, 2 blocks
    spec = net.genotype()
    rows = net.width_rows
    assert spec["shortcut"] == "avgpool_conv" and spec["stem"] == rows[0][0]
    assert [len(s) for s in spec["stages"]] == [1, 3, 2]
    assert spec["stages"][0][0] == [rows[1][1], rows[2][2]]
    assert spec["stages"][1][0] == [rows[7][7], rows[8][0]]  # rows 3..6 belong to dropped blocks
    built = models.build(spec)
    # The next stage starts from the last kept block's output.
    assert built.stages[1][0].conv1.in_channels == spec["stages"][0][0][1]
    assert built.stages[1][0].shortcut.conv.in_channels == spec["stages"][0][0][1]
    assert built.stages[2][0].conv1.in_channels == spec["stages"][1][2][1]
    assert counted_macs(built, 32) == models.macs(spec) - spec["num_classes"]  # FC bias is not a matmul


def test_single_path_of_the_super_net_equals_the_built_genotype():
    net = search_net("20").eval()
    # Uniform widths per stage: no stride-1 width-change shortcuts, so the two nets are identical.
    width_idx = [3] + [3] * 6 + [5] * 6 + [2] * 6
    set_argmax(net, width_idx, [1, 0, 2])
    assert_single_path_equals_built_genotype(net, 32)


def assert_single_path_equals_built_genotype(net: SearchResNet, size: int) -> None:
    """The super-net restricted to its argmax genotype computes the built genotype with sliced weights."""
    spec = net.genotype()
    built = models.build(spec).eval()
    with torch.no_grad():
        for m in net.modules():  # non-trivial BN statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        built.load_state_dict(genotype_state(net, spec))  # strict: no shortcut the super-net lacks
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(net(x, net.fixed_sample(spec)), built(x), atol=1e-5, rtol=0)


def genotype_state(net: SearchResNet, spec: dict) -> dict[str, torch.Tensor]:
    """Slice the super-net's weights into the built genotype's state_dict (prefix slices; the
    candidate BN of the kept width). Any family: a conv's BN is the next entry of the walk."""
    built = models.build(spec).state_dict()
    walk = models.layers(spec, net.input_size)
    bn_after = {a.name: b.name for a, b in itertools.pairwise(walk) if a.kind == "conv" and b.kind == "bn"}
    kept = [net.stem] + [
        conv
        for s, stage in enumerate(spec["stages"])
        for b in range(len(stage))
        for conv in (*net.stages[s][b].convs, net.stages[s][b].shortcut)
        if conv is not None
    ]
    state = {}
    for conv in kept:
        cout, cin = built[f"{conv.name}.weight"].shape[:2]
        state[f"{conv.name}.weight"] = conv.conv.weight[:cout, :cin]
        if conv.name in bn_after:
            bn = conv.bns[conv.candidates.index(cout)]
            state.update({f"{bn_after[conv.name]}.{k}": v for k, v in bn.state_dict().items()})
    cin = built["fc.weight"].shape[1]
    state["fc.weight"], state["fc.bias"] = net.fc.weight[:, :cin], net.fc.bias
    return state


def test_shrink_to_budget_reaches_the_target_through_candidates_then_floors():
    net = search_net("20")
    set_argmax(net, [7] * 19, [2, 2, 2])
    full = net.genotype()
    target = int(0.2 * models.macs(full))
    floors = [max(1, r[-1] // 4) for r in net.width_rows]
    spec = shrink_to_budget(net, full, floors, target)
    assert models.macs(spec) <= target
    assert [len(s) for s in spec["stages"]] == [3, 3, 3]  # widths suffice: depth untouched
    for slot, _, row in net.conv_slots(spec):
        assert get_path(spec, slot.path) >= floors[row]


# -- the method ------------------------------------------------------------------------------


def test_step_logs_diagnostics_and_best_shrinks_an_over_budget_genotype(make_ctx):
    # A budget below every all-candidate genotype forces the fallback.
    ctx = make_ctx(budget=0.03, n_train=96, n_test=32, finetune=TrainConfig(epochs=1, batch_size=32))
    cls = get_method("tas")
    method = cls(ctx, {**cls.smoke, "epochs": 1})
    result = method.step()
    for key in (
        "macs",
        "expected_macs",
        "discrepancy",
        "tau",
        "train_loss",
        "arch_ce",
        "cost_loss",
        "val_top1",
        "search_val_top1",
        "target_ratio",
    ):
        assert math.isfinite(result.metrics[key]), key
    assert result.metrics["tau"] == 5.0 and result.metrics["in_budget"] == 0.0
    assert result.subnets[0].macs == result.metrics["macs"] > method.target_macs
    best = method.best()
    assert within_budget(best.spec, ctx.spec, ctx.budget, ctx.input_size)
    assert best.source["shrunk_from"] == result.subnets[0].key
    # Scoring a genotype (BN re-estimation on a copy) leaves the search state untouched.
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    assert method._val_top1(method.net.genotype()) == result.metrics["val_top1"]
    assert all(torch.equal(before[k], v) for k, v in method.net.state_dict().items())


# -- the ImageNet `resnet` family ------------------------------------------------------------


def resnet_search_net(variant: str) -> SearchResNet:
    """A tiny `resnet` super-net (32x32 input, 10 classes) with two blocks per stage (depth (1, 2))."""
    spec = models.full_spec(f"resnet:{variant}", num_classes=10)
    spec["stages"] = [[list(block) for block in stage * 2] for stage in spec["stages"]]
    torch.manual_seed(0)
    return SearchResNet(spec)


def test_imagenet_depth_rows_of_the_standard_nets():
    rule = DEPTH_RULES[models.FAMILIES.get("resnet").residual_net(models.full_spec("resnet:50")).depth_rule]
    assert rule([3, 4, 6, 3]) == [(1, 2, 3), (1, 2, 4), (2, 4, 6), (1, 2, 3)]  # ResNet-50
    assert rule([2, 2, 2, 2]) == [(1, 2)] * 4  # ResNet-18
    needle = "family 'vgg' declares no residual blocks .* supports 'cifar_resnet' and 'resnet' specs"
    with pytest.raises(SpecError, match=needle):
        SearchResNet(models.full_spec("vgg:tiny"))


@pytest.mark.parametrize("variant", ["tiny", "tiny_bottleneck"])
def test_resnet_super_net_layout_forward_and_backward(variant):
    net = resnet_search_net(variant)
    convs = 2 if variant == "tiny" else 3
    assert len(net.width_rows) == 1 + 4 * 2 * convs and net.depth_rows == [(1, 2)] * 4
    assert net.stem.name == "conv1" and net.stem.conv.kernel_size == (7, 7) and net.stem_pool
    # torchvision's downsample: stages 1-3 (stride 2) and, for bottlenecks, stage 0's first block.
    with_shortcut = [(s, b) for s, stage in enumerate(net.stages) for b, block in enumerate(stage) if block.shortcut]
    assert with_shortcut == ([(0, 0)] if variant != "tiny" else []) + [(1, 0), (2, 0), (3, 0)]
    for s, b in with_shortcut:
        block = net.stages[s][b]
        assert block.shortcut.row == block.convs[-1].row and block.shortcut.bns is not None
        assert block.shortcut.conv.stride == ((2, 2) if s else (1, 1)) and block.shortcut.pool is None
    if variant == "tiny_bottleneck":
        assert net.stages[1][0].convs[1].conv.stride == (2, 2)  # the 3x3 conv carries the stride
    sample = net.sample(1.0, torch.Generator().manual_seed(0))
    logits = net(torch.randn(2, 3, 32, 32), sample)
    assert logits.shape == (2, 10)
    logits.logsumexp(dim=1).sum().backward()
    assert (net.width_logits.grad.abs().sum(dim=1) > 0).all() and (net.depth_logits.grad.abs().sum(dim=1) > 0).all()


def favour(net: SearchResNet, widest: bool, strength: float = 50.0) -> None:
    """Logits that put (almost) all probability on the narrowest (or widest) width of every conv
    and on the full depth of every stage."""
    with torch.no_grad():
        net.width_logits.zero_()
        net.depth_logits.zero_()
        for r, row in enumerate(net.width_rows):
            net.width_logits[r, len(row) - 1 if widest else 0] = strength
        net.depth_logits[:, -1] = strength  # (every stage of these nets has as many depth candidates)


def test_resnet_expected_macs_relaxation():
    net = resnet_search_net("tiny_bottleneck")
    with torch.no_grad():
        net.width_logits.zero_()
        net.depth_logits.zero_()
        uniform = float(net.expected_macs())
    favour(net, widest=False)  # ratio 0.3 everywhere: identity blocks keep equal widths
    narrow = net.genotype()
    assert float(net.expected_macs().detach()) == pytest.approx(models.macs(narrow) - 10, rel=1e-9)  # no FC bias
    favour(net, widest=True)
    assert float(net.expected_macs().detach()) == pytest.approx(models.macs(net.spec) - 10, rel=1e-9)
    assert models.macs(narrow) < uniform < models.macs(net.spec)
    assert math.isfinite(uniform)


def test_resnet50_super_net_at_full_width_and_depth_is_the_reference_resnet50():
    torch.manual_seed(0)
    spec = models.full_spec("resnet:50", num_classes=1000)
    net = SearchResNet(spec)
    assert len(net.width_rows) == 1 + 16 * 3 and net.depth_rows == imagenet_depth_candidates([3, 4, 6, 3])
    favour(net, widest=True)
    assert net.genotype() == spec
    assert float(net.expected_macs().detach()) == 4_089_185_256 - 1000  # ResNet-50's MACs without the FC bias


@pytest.mark.parametrize("variant", ["tiny", "tiny_bottleneck"])
def test_resnet_genotype_is_a_valid_spec_whose_macs_match_the_flop_counter(variant):
    net = resnet_search_net(variant)
    set_argmax(net, [r % len(row) for r, row in enumerate(net.width_rows)], [0, 1, 1, 0])  # keep 1, 2, 2, 1
    spec = net.genotype()
    models.validate(spec)
    assert spec["family"] == "resnet" and spec["input_size"] == 32 and [len(s) for s in spec["stages"]] == [1, 2, 2, 1]
    built = models.build(spec).eval()
    # Independent residual widths: stride-1 blocks whose widths differ get a projection.
    assert built.layer2[1].downsample is not None and built.layer2[1].downsample[0].stride == (1, 1)
    assert built.layer2[0].conv1.in_channels == spec["stages"][0][0][-1]  # the last kept block feeds on
    assert counted_macs(built, 32) == models.macs(spec) - 10
    assert models.params(spec) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("variant", ["tiny", "tiny_bottleneck"])
def test_resnet_single_path_of_the_super_net_equals_the_built_genotype(variant):
    net = resnet_search_net(variant).eval()
    # Residual widths follow the full width (identity blocks keep equal widths); inner ones vary.
    residual = {net.stem.row} | {block.convs[-1].row for stage in net.stages for block in stage}
    index_of = {4: 2, 8: 2, 16: 5, 32: 6, 64: 3}
    width_idx = [index_of[row[-1]] if r in residual else r % len(row) for r, row in enumerate(net.width_rows)]
    set_argmax(net, width_idx, [1, 0, 1, 0])
    assert_single_path_equals_built_genotype(net, 32)


def test_tas_searches_a_resnet_and_shrinks_its_genotype_into_the_budget(tmp_path):
    spec = resnet_search_net("tiny").spec
    train, test = synthetic_dataset(n_train=64, n_test=16, num_classes=10, size=32, seed=0)
    ctx = RunContext(
        spec=spec,
        train=train,
        test=test,
        budget=Budget(flops_target=0.1),
        seed=0,
        workdir=tmp_path,
        finetune=TrainConfig(epochs=1, batch_size=32),
        progress=False,
    )
    cls = get_method("tas")
    method = cls(ctx, {**cls.smoke, "epochs": 1, "bn_recalibration_batches": 1})
    result = method.step()
    assert result.subnets[0].spec["family"] == "resnet" and math.isfinite(result.metrics["expected_macs"])
    best = method.best()
    models.validate(best.spec)
    assert best.macs <= 0.1 * models.macs(spec) and "shrunk_from" in best.source
