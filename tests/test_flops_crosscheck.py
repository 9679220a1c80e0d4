"""The analytic MACs/params of every family agree with torch's FlopCounterMode and numel().

FlopCounterMode counts 2 FLOPs per multiply-accumulate and ignores biases, so the analytic
count must satisfy ``flops == 2 * (macs - bias_macs)`` for a batch of one. Networks are built on
the meta device: FlopCounterMode only needs shapes, so even ResNet-50 at 224 costs no compute.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rayprune import models


def assert_counts_match(spec, input_size):
    with torch.device("meta"):
        net = models.build(spec).eval()
        x = torch.empty(1, 3, input_size, input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    layers = models.layers(spec, input_size)
    macs = models.macs(spec, input_size)
    assert counter.get_total_flops() == 2 * (macs - sum(layer.bias_macs for layer in layers))
    assert models.params(spec) == sum(p.numel() for p in net.parameters())


def random_widths(spec, seed):
    """A random width in [1, full width] for every channel group (seeded)."""
    rng = random.Random(seed)
    return models.with_widths(spec, {g.name: rng.randint(1, g.width) for g in models.channel_groups(spec)})


def small_bottleneck(shortcut):
    """ResNet-164 cut down to 2 bottleneck blocks per stage (a depth-pruned spec)."""
    spec = models.full_spec("cifar_resnet:164", shortcut=shortcut)
    return {**spec, "stages": [stage[:2] for stage in spec["stages"]]}


FULL = [  # (spec factory, input size)
    (lambda: models.full_spec("cifar_resnet:20", shortcut="option_a"), 32),
    (lambda: models.full_spec("cifar_resnet:20", shortcut="avgpool_conv"), 32),
    (lambda: models.full_spec("cifar_resnet:20", shortcut="conv_bn", num_classes=100), 32),
    (lambda: models.full_spec("cifar_resnet:164", shortcut="avgpool_conv"), 32),
    (lambda: models.full_spec("vgg:16"), 32),
    (lambda: models.full_spec("vgg:19", num_classes=100), 32),
    (lambda: models.full_spec("mobilenet_v2:1.0", num_classes=1000), 224),
    (lambda: models.full_spec("mobilenet_v2:cifar"), 32),
    (lambda: models.full_spec("resnet:50", num_classes=1000), 224),
    (lambda: models.full_spec("resnet:18", num_classes=1000), 224),
]


@pytest.mark.parametrize("make,size", FULL, ids=[f"full{i}" for i in range(len(FULL))])
def test_full_specs(make, size):
    assert_counts_match(make(), size)


PRUNABLE = {  # small nets of every family and shortcut kind, with an input size that suits them
    "cifar_resnet-option_a": (lambda: models.full_spec("cifar_resnet:tiny", shortcut="option_a"), 16),
    "cifar_resnet-avgpool_conv": (lambda: models.full_spec("cifar_resnet:tiny", shortcut="avgpool_conv"), 16),
    "cifar_resnet-conv_bn": (lambda: models.full_spec("cifar_resnet:tiny", shortcut="conv_bn"), 16),
    "cifar_resnet-bottleneck-avgpool_conv": (lambda: small_bottleneck("avgpool_conv"), 16),
    "cifar_resnet-bottleneck-conv_bn": (lambda: small_bottleneck("conv_bn"), 16),
    "vgg": (lambda: models.full_spec("vgg:tiny"), 32),
    "vgg-odd-input": (lambda: models.full_spec("vgg:tiny"), 13),
    "mobilenet_v2": (lambda: models.full_spec("mobilenet_v2:tiny"), 32),
    "mobilenet_v2-imagenet": (lambda: models.full_spec("mobilenet_v2:0.35", num_classes=10), 64),
    "resnet-basic": (lambda: models.full_spec("resnet:tiny"), 32),
    "resnet-bottleneck": (lambda: models.full_spec("resnet:tiny_bottleneck"), 32),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(PRUNABLE))
def test_randomly_pruned_specs(name, seed):
    make, size = PRUNABLE[name]
    spec = make()
    pruned = random_widths(spec, seed)
    assert models.macs(pruned, size) < models.macs(spec, size)
    assert_counts_match(pruned, size)


def test_resnet_with_stride1_projections():
    """Independent residual widths (a TAS genotype) give 1x1 conv + BN projections; counted exactly."""
    for model, size in (("resnet:tiny", 32), ("resnet:tiny_bottleneck", 32), ("resnet:18", 64)):
        spec = random_widths(models.full_spec(model), seed=5)
        spec["stem"] += 1  # differs from stage 0's first output (and, for bottlenecks, changes nothing)
        spec["stages"][1].append([3] * (len(spec["stages"][1][0]) - 1) + [spec["stages"][1][0][-1] + 2])
        net = models.build(spec)
        assert net.layer2[-1].downsample is not None
        assert (net.layer1[0].downsample is not None) and net.layer1[0].downsample[0].stride == (1, 1)
        assert_counts_match(spec, size)


def blocks_per_stage(model, counts, **options):
    """The full spec of ``model`` keeping the first ``counts[s]`` blocks (or convs) of stage s."""
    spec = models.full_spec(model, **options)
    return {**spec, "stages": [stage[:n] for stage, n in zip(spec["stages"], counts, strict=True)]}


DEPTH_PRUNED = [
    blocks_per_stage("cifar_resnet:20", (1, 2, 3), shortcut="avgpool_conv"),
    blocks_per_stage("cifar_resnet:20", (3, 1, 1), shortcut="option_a"),
    blocks_per_stage("cifar_resnet:56", (2, 9, 1), shortcut="conv_bn"),
    blocks_per_stage("cifar_resnet:164", (1, 1, 2), shortcut="conv_bn"),
    blocks_per_stage("vgg:16", (1, 2, 1, 2, 1)),
    blocks_per_stage("resnet:18", (1, 1, 2, 1)),
    blocks_per_stage("resnet:50", (1, 2, 1, 3)),
]


@pytest.mark.parametrize("spec", DEPTH_PRUNED, ids=[f"{s['family']}{i}" for i, s in enumerate(DEPTH_PRUNED)])
def test_depth_pruned_specs(spec):
    assert_counts_match(random_widths(spec, seed=3), 32)


def test_depth_pruned_mobilenet():
    spec = models.full_spec("mobilenet_v2:cifar_0.5")
    for stage in spec["stages"]:
        stage["hidden"] = stage["hidden"][:1]  # one block per stage
    assert_counts_match(random_widths(spec, seed=4), 32)
