"""Weight transfer (extract / write back / zero the dropped channels) is exact for every family."""

from __future__ import annotations

import copy

import pytest
import torch

from rayprune import models
from rayprune.models.transfer import extract_subnet, full_keep, subnet_spec, write_back, zero_dropped


def small_bottleneck(shortcut):
    """ResNet-164 cut down to 2 bottleneck blocks per stage (a depth-pruned spec)."""
    spec = models.full_spec("cifar_resnet:164", shortcut=shortcut)
    return {**spec, "stages": [stage[:2] for stage in spec["stages"]]}


NETS = {  # name -> (spec factory, input size)
    "cifar_resnet-avgpool_conv": (lambda: models.full_spec("cifar_resnet:tiny", shortcut="avgpool_conv"), 16),
    "cifar_resnet-conv_bn": (lambda: models.full_spec("cifar_resnet:tiny", shortcut="conv_bn"), 16),
    "cifar_resnet-bottleneck": (lambda: small_bottleneck("avgpool_conv"), 16),
    "vgg": (lambda: models.full_spec("vgg:tiny"), 32),
    "mobilenet_v2": (lambda: models.full_spec("mobilenet_v2:tiny"), 32),
    "resnet-basic": (lambda: models.full_spec("resnet:tiny"), 32),
    "resnet-bottleneck": (lambda: models.full_spec("resnet:tiny_bottleneck"), 32),
}


def random_net(spec, seed):
    """A network whose BN running statistics and affine parameters are random too, so that a
    channel that is wrongly kept or wrongly aligned changes the output."""
    torch.manual_seed(seed)
    net = models.build(spec)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return net.eval()


def random_keep(spec, seed, only=None):
    """Random kept indices (at least one) for every channel group (or the groups ``only`` accepts)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in models.channel_groups(spec):
        if only is None or only(g):
            n = int(torch.randint(1, g.width + 1, (1,), generator=gen))
            keep[g.name] = torch.randperm(g.width, generator=gen)[:n]
    return keep


def outputs(spec, state, size, seed=0):
    net = models.build(spec).eval()
    net.load_state_dict(state)  # strict: the subnet's keys and shapes must match
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return net(x)


def clone_state(state):
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("name", list(NETS))
def test_zeroing_dropped_channels_equals_the_extracted_subnet(name):
    make, size = NETS[name]
    spec = make()
    state = random_net(spec, seed=1).state_dict()
    for seed in range(2):
        keep = random_keep(spec, seed)
        sub_spec, sub_state = extract_subnet(spec, state, keep)
        assert sub_spec == subnet_spec(spec, keep)
        masked = clone_state(state)
        zero_dropped(spec, masked, keep)
        torch.testing.assert_close(
            outputs(spec, masked, size), outputs(sub_spec, sub_state, size), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("name", list(NETS))
def test_full_keep_is_the_identity(name):
    make, size = NETS[name]
    spec = make()
    state = random_net(spec, seed=2).state_dict()
    sub_spec, sub_state = extract_subnet(spec, state, full_keep(spec))
    assert sub_spec == spec
    assert all(torch.equal(sub_state[k], state[k]) for k in state)
    masked = clone_state(state)
    zero_dropped(spec, masked, {})
    assert all(torch.equal(masked[k], state[k]) for k in state)
    assert torch.equal(outputs(sub_spec, sub_state, size), outputs(spec, state, size))


@pytest.mark.parametrize("name", list(NETS))
def test_write_back_restores_and_touches_exactly_the_kept_entries(name):
    make, _ = NETS[name]
    spec = make()
    state = random_net(spec, seed=3).state_dict()
    keep = random_keep(spec, seed=7)
    _, sub_state = extract_subnet(spec, state, keep)

    restored = clone_state(state)
    write_back(spec, restored, keep, sub_state)
    assert all(torch.equal(restored[k], state[k]) for k in state)

    scrambled = {k: torch.full_like(v, 7) for k, v in state.items()}  # write into a different network
    write_back(spec, scrambled, keep, sub_state)
    _, again = extract_subnet(spec, scrambled, keep)
    assert all(torch.equal(again[k], sub_state[k]) for k in sub_state)

    modified = {k: v + 1 for k, v in sub_state.items()}
    written = clone_state(state)
    write_back(spec, written, keep, modified)
    widths = {g.name: g.width for g in models.channel_groups(spec)}
    for key, axes in models.tensor_axes(spec).items():
        expected = torch.ones(state[key].shape, dtype=torch.bool)
        for dim, group in enumerate(axes):
            if group is not None:
                kept = torch.zeros(widths[group], dtype=torch.bool)
                kept[keep[group]] = True
                shape = [1] * len(axes)
                shape[dim] = -1
                expected &= kept.view(shape)
        assert torch.equal(written[key] != state[key], expected), key


def test_option_a_transfer_is_exact_when_stage_boundaries_keep_everything():
    """option_a's parameter-free shortcut pads channels by *position*, so only subnets that keep
    every channel of the groups around the stride-2 blocks transfer exactly (the documented caveat)."""
    spec = models.full_spec("cifar_resnet:tiny", shortcut="option_a")
    state = random_net(spec, seed=4).state_dict()
    keep = random_keep(spec, seed=5, only=lambda g: g.kind == "inner")
    sub_spec, sub_state = extract_subnet(spec, state, keep)
    masked = clone_state(state)
    zero_dropped(spec, masked, keep)
    torch.testing.assert_close(outputs(spec, masked, 16), outputs(sub_spec, sub_state, 16), atol=1e-5, rtol=1e-5)

    # Pruning a residual group moves the zero padding: the subnet computes something else.
    keep = {"stem": torch.arange(1, 8)}
    sub_spec, sub_state = extract_subnet(spec, state, keep)
    masked = clone_state(state)
    zero_dropped(spec, masked, keep)
    assert not torch.allclose(outputs(spec, masked, 16), outputs(sub_spec, sub_state, 16), atol=1e-3)


def test_mobilenet_depthwise_and_unexpanded_blocks_follow_their_input_group():
    spec = models.full_spec("mobilenet_v2:tiny")
    axes = models.tensor_axes(spec)
    # Block 0 has no expansion conv: its depthwise conv runs on the stem's channels.
    assert axes["features.1.conv.0.0.weight"] == ("stem", None, None, None)
    assert axes["features.1.conv.1.weight"] == ("s0.out", "stem", None, None)
    assert axes["features.3.conv.1.0.weight"] == ("s1.b1.hidden", None, None, None)
    assert axes["features.3.conv.3.weight"] == ("s1.out",)  # tied to block 0's output by the residual
    state = random_net(spec, seed=6).state_dict()
    _, sub_state = extract_subnet(spec, state, {"stem": torch.tensor([0, 3, 5]), "s1.b1.hidden": torch.tensor([2])})
    assert sub_state["features.1.conv.0.0.weight"].shape == (3, 1, 3, 3)
    assert torch.equal(sub_state["features.3.conv.1.0.weight"], state["features.3.conv.1.0.weight"][2:3])


def test_extract_subnet_leaves_the_full_state_untouched():
    spec = models.full_spec("resnet:tiny")
    state = random_net(spec, seed=8).state_dict()
    before = copy.deepcopy(state)
    extract_subnet(spec, state, random_keep(spec, seed=9))
    assert all(torch.equal(before[k], state[k]) for k in state)


def test_pruning_never_changes_the_cifar_bottleneck_structure():
    spec = small_bottleneck("avgpool_conv")
    keep = {"stem": torch.arange(12), "s0.b0.out": torch.arange(12)}  # equal widths by chance
    state = random_net(spec, seed=10).state_dict()
    sub_spec, sub_state = extract_subnet(spec, state, keep)
    assert [g.name for g in models.channel_groups(sub_spec)] == [g.name for g in models.channel_groups(spec)]
    outputs(sub_spec, sub_state, 16)  # strict load: the subnet still has its projection shortcut


def test_resnet_projection_blocks_transfer_exactly():
    """A stride-1 projection (unequal residual widths) unties its block's input and output groups."""
    spec = models.full_spec("resnet:tiny")
    spec["stem"] = 6  # stage 0's first block becomes a 6 -> 8 projection
    spec["stages"][2].append([16, 12])  # and a 16 -> 12 one
    state = random_net(spec, seed=11).state_dict()
    keep = random_keep(spec, seed=12)
    keep["stem"], keep["s0.b0.out"] = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4, 7])  # still unequal
    keep["s2.b0.out"], keep["s2.b1.out"] = torch.arange(1, 16), torch.tensor([0, 11])
    sub_spec, sub_state = extract_subnet(spec, state, keep)
    assert sub_spec["stem"] == 3 and sub_spec["stages"][0][0][1] == 4 and sub_spec["stages"][2][1][1] == 2
    masked = clone_state(state)
    zero_dropped(spec, masked, keep)
    torch.testing.assert_close(outputs(spec, masked, 32), outputs(sub_spec, sub_state, 32), atol=1e-5, rtol=1e-5)
