"""SP on traced networks: the stage split comes from the torch.fx graph (cut where one 4-D
tensor is alive, at each resolution change); a network without such a split is refused in one
line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayprune import models
from rayprune.grid import TargetWindow
from rayprune.methods.sp import SP
from rayprune.testing import tiny_context
from rayprune.testing.bad_input import refused

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "two_branch.py"
SIZE = 16  # tiny_context's synthetic images


@pytest.fixture(scope="module")
def resnet18():
    return models.full_spec("torchvision:resnet18", num_classes=4, input_size=SIZE)


def assert_stages_compose_to(net, split):
    """The split's stages, then its head, compute exactly what the net computes."""
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = x
        for stage in split.stages:
            h = stage(h)
        assert torch.equal(split.head(h), net(x))


def test_the_split_follows_the_resolutions_and_composes_to_the_net(resnet18):
    net = models.build(resnet18, seed=0).eval()
    split = models.family_of(resnet18).stage_split(resnet18, net)
    # 16 px: conv1 -> 8, maxpool -> 4, layer2 -> 2, layer3 -> 1 (layer4 stays at 1x1)
    assert split.boundary == ["conv1", "conv1", "layer2.0.conv2", "layer4.0.conv2"]
    assert [len(m) for m in split.modules] == [3, 13, 14, 30]  # maxpool, blocks' modules; the head's fc last
    assert split.modules[-1][-1] is net.fc
    assert_stages_compose_to(net, split)


def test_mobilenet_v3_small_splits_at_its_resolutions_too():
    spec = models.full_spec("torchvision:mobilenet_v3_small", num_classes=4, input_size=SIZE)
    net = models.build(spec, seed=0).eval()
    split = models.family_of(spec).stage_split(spec, net)
    # 16 px: stem -> 8, features.1 -> 4, features.2 -> 2, features.4 -> 1; a stride-2 block without a
    # residual add is cut inside, before its depthwise conv (where its expansion is the one live tensor)
    assert split.boundary == ["features.0.0", "features.2.block.0.0", "features.4.block.0.0", "features.12.0"]
    assert_stages_compose_to(net, split)


def test_a_grouped_convs_tiled_group_can_end_a_stage():
    spec = models.full_spec(f"{EXAMPLE}:two_branch", num_classes=4, input_size=SIZE)
    net = models.build(spec, seed=0).eval()
    split = models.family_of(spec).stage_split(spec, net)
    assert split.boundary == ["stem.0", "grouped.0", "deep.0"]  # grouped.0: 4 blocks, SP masks a prefix of each
    assert_stages_compose_to(net, split)


@pytest.mark.slow  # SP's smoke run on an 11M-parameter net: minutes on a loaded 2-core machine
def test_sp_on_resnet18_lands_in_its_window(tmp_path, resnet18):
    teacher = models.build(resnet18, seed=5)
    ctx = tiny_context(tmp_path, spec=resnet18, budget=0.5, n_train=32, n_test=16, teacher=teacher)
    small = {"population": 4, "generations": 1, "parents": 2, "mutation_children": 2, "crossover_children": 2}
    run = SP(ctx, {**SP.smoke, **small, "recalib_images": 16, "proxy_per_class": 4})
    run.run()
    best = run.best()
    assert best.macs == models.macs(best.spec, SIZE)
    assert TargetWindow(ctx.budget.target_macs(resnet18, SIZE)).contains(best.macs), best.macs
    models.validate(best.spec)


CAT_STAGE = """
import torch
from torch import nn


def cbr(i, o, stride=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class CatStage(nn.Module):  # its first stage would end in a concatenation (two channel groups)
    def __init__(self, num_classes=10):
        super().__init__()
        self.a, self.b, self.down, self.fc = cbr(3, 8), cbr(3, 8), cbr(16, 16, 2), nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.down(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def cat_stage(num_classes=10):
    return CatStage(num_classes)
"""


def test_a_network_without_a_stage_split_is_refused_in_one_line(capsys, tmp_path):
    file = tmp_path / "cat_stage.py"
    file.write_text(CAT_STAGE)
    argv = ["run", "--method", "sp", "--model", f"{file}:cat_stage", "--dataset", "digits", "--smoke"]
    refused(capsys, tmp_path, [*argv, "--flops-target", "0.5", "--out", str(tmp_path / "out")], "sp: model", "stage")
