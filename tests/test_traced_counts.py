"""Traced families (``torchvision:NAME``, ``file.py:FACTORY``): channel groups from the
dependency graph, and exact MACs/params from the traced layer table.

The independent count is ``FlopCounterMode`` (2 FLOPs per multiply-accumulate, biases left out)
plus the bias terms, and ``sum(p.numel())``, on the built (pruned) net. Nets are built on the
meta device: counting needs shapes only.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rayprune import models

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "two_branch.py"
SOURCES = [
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:vgg11_bn",  # a flatten of a 7x7 map into a linear
    f"{EXAMPLE}:two_branch",  # a concatenation and a grouped conv
]
SIZE = 32


@pytest.fixture(scope="module", params=SOURCES, ids=[s.rpartition(":")[2] for s in SOURCES])
def full(request):
    return models.full_spec(request.param, num_classes=10, input_size=SIZE)


def counted(spec):
    """(MACs, params) of the built net by FlopCounterMode plus bias terms, and numel."""
    with torch.device("meta"):
        net = models.build(spec).eval()
        x = torch.empty(1, 3, SIZE, SIZE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = net(x)
    assert tuple(out.shape) == (1, spec["num_classes"])
    bias = sum(layer.bias_macs for layer in models.layers(spec, SIZE))
    return counter.get_total_flops() // 2 + bias, sum(p.numel() for p in net.parameters())


def random_widths(spec, seed):
    rng = random.Random(seed)  # a grouped conv's groups take multiples of their divisor
    groups = models.channel_groups(spec)
    return models.with_widths(spec, {g.name: rng.randint(1, g.width // g.divisor) * g.divisor for g in groups})


def test_full_counts_are_exact(full):
    assert counted(full) == (models.macs(full, SIZE), models.params(full))


def test_pruned_counts_are_exact(full):
    pruned = random_widths(full, 0)  # the family itself checked the halved widths when tracing
    assert pruned != full
    assert counted(pruned) == (models.macs(pruned, SIZE), models.params(pruned))
    assert models.macs(pruned, SIZE) < models.macs(full, SIZE)


def test_spec_is_plain_json_and_validates(full):
    import json

    assert json.loads(json.dumps(full)) == full
    assert set(full) == {"family", "source", "options", "num_classes", "input_size", "widths"}
    assert models.validate(full) is full
    assert [g.name for g in models.channel_groups(full)] == list(full["widths"])


def test_resnet18_groups_follow_the_residual_adds():
    spec = models.full_spec("torchvision:resnet18", num_classes=10, input_size=SIZE)
    groups = {g.name: g for g in models.channel_groups(spec)}
    # Each stage's residual stream is one group (tied by the adds), named after its first producer.
    assert [n for n, g in groups.items() if g.kind == "residual"] == [
        "conv1",
        "layer2.0.conv2",
        "layer3.0.conv2",
        "layer4.0.conv2",
    ]
    assert len(groups) == 12
    assert [g.stage for g in groups.values()] == [0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]  # 16, 8, 4, 2, 1 px
    axes = models.tensor_axes(spec)
    assert axes["layer1.1.conv2.weight"][0] == "conv1"
    assert axes["layer2.0.downsample.0.weight"] == ("layer2.0.conv2", "conv1", None, None)
    assert axes["fc.weight"] == (None, "layer4.0.conv2")  # the classes are never pruned
    assert models.params(spec) == 11_181_642


def test_user_file_concat_and_grouped_conv():
    spec = models.full_spec(f"{EXAMPLE}:two_branch", num_classes=10, input_size=SIZE)
    assert spec["widths"] == {"stem.0": 16, "left.0": 16, "right.0": 8, "mix.0": 32, "grouped.0": 32, "deep.0": 32}
    groups = models.channel_groups(spec)
    assert [g.stage for g in groups] == [0, 1, 1, 1, 1, 2]
    assert [g.divisor for g in groups] == [1, 1, 1, 4, 4, 1]  # the grouped conv's 4 groups stay
    axes = models.tensor_axes(spec)
    assert axes["mix.0.weight"] == ("mix.0", "left.0+right.0", None, None)  # the concatenation, in order
    assert axes["grouped.0.weight"] == ("grouped.0", "mix.0/4", None, None)  # each block reads its own input
    assert axes["head.weight"] == (None, "deep.0")


def test_vgg_flatten_repeats_each_channel():
    spec = models.full_spec("torchvision:vgg11_bn", num_classes=10, input_size=SIZE)
    assert models.tensor_axes(spec)["classifier.0.weight"] == ("classifier.0", "features.25*49")


def test_a_relative_file_is_stored_absolute(monkeypatch):
    monkeypatch.chdir(EXAMPLE.parent)
    spec = models.full_spec("two_branch.py:two_branch", num_classes=3, input_size=SIZE)
    assert spec["source"] == f"{EXAMPLE}:two_branch"
