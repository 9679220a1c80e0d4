"""The Family hooks the super-net methods read (TAS: residual blocks, width slots, depths; SP:
the stage split of a built model): consistent with each family's own analytic walk, and enough on
their own: a family registered from outside the package runs TAS and SP with no edit to either."""

from __future__ import annotations

import math

import pytest
import torch

from rayprune import models
from rayprune.methods import get_method, within_budget
from rayprune.models.base import get_path
from rayprune.models.cifar_resnet import CifarResNetFamily


@pytest.mark.parametrize("model", ["cifar_resnet:tiny", "cifar_resnet:164", "resnet:tiny_bottleneck", "resnet:18"])
def test_residual_blocks_and_width_slots_name_the_convs_of_the_analytic_walk(model):
    spec = models.full_spec(model)
    family = models.family_of(spec)
    convs = {layer.name: layer for layer in models.layers(spec) if layer.kind == "conv"}
    slots = family.width_slots(spec)
    assert [get_path(spec, s.path) for s in slots] == [convs[s.layer].out_channels for s in slots]
    net = family.residual_net(spec)
    assert [net.stem, *(c for block in net.blocks for c in block.convs)] == [s.layer for s in slots]
    search_convs = {layer.name for layer in models.layers(net.spec) if layer.kind == "conv"}  # the search's shortcuts
    assert all(block.shortcut in search_convs for block in net.blocks if block.shortcut is not None)
    shallow = family.with_depths(spec, [1] * len(spec["stages"]))
    models.validate(shallow)
    assert [len(stage) for stage in shallow["stages"]] == [1] * len(spec["stages"])


@pytest.mark.parametrize("model", ["cifar_resnet:tiny", "mobilenet_v2:tiny"])
def test_stage_split_chains_to_the_model_and_owns_every_parameter(model):
    spec = models.full_spec(model, num_classes=4)
    net = models.build(spec, seed=0).eval()
    split = models.family_of(spec).stage_split(spec, net)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = x
        for stage in split.stages:
            h = stage(h)
        assert torch.allclose(split.head(h), net(x), atol=1e-5)
    groups = {g.name for g in models.channel_groups(spec)}
    assert len(split.boundary) == len(split.stages) and set(split.boundary) <= groups
    owned = [p for modules in split.modules for m in modules for p in m.parameters()]
    assert sorted(map(id, owned)) == sorted(map(id, net.parameters()))


def test_families_without_a_hook_are_refused_by_name():
    spec = models.full_spec("vgg:tiny", num_classes=4)
    assert not models.family_of(spec).implements("stage_split")
    with pytest.raises(models.SpecError, match="no stage split"):
        models.family_of(spec).stage_split(spec, models.build(spec))


class ToyResNetFamily(CifarResNetFamily):
    """A family defined outside the package (here: CIFAR ResNet blocks, uneven depths)."""

    name = "toy_resnet"

    def variants(self) -> list[str]:
        return ["toy"]

    def full_spec(self, variant: str, num_classes: int = 10, **options) -> models.Spec:
        spec = super().full_spec("tiny", num_classes, shortcut="avgpool_conv")
        return {**spec, "family": self.name, "stem": 8, "stages": [[[8, 8]], [[16, 16]] * 3, [[32, 32]] * 2]}


@pytest.fixture
def toy_spec(monkeypatch):
    monkeypatch.setitem(models.FAMILIES._items, "toy_resnet", ToyResNetFamily())  # the one registration line
    return models.full_spec("toy_resnet:toy", num_classes=4)


@pytest.mark.parametrize("method", ["tas", "sp"])
def test_a_new_family_runs_the_super_net_methods_through_its_hooks_alone(method, toy_spec, make_ctx):
    cls = get_method(method)
    ctx = make_ctx(spec=toy_spec, budget=0.6, max_stage_prune=[0.7] * 3, teacher=models.build(toy_spec, seed=5))
    m = cls(ctx, {**cls.smoke, "epochs": 1} if method == "tas" else cls.smoke)
    results = m.run(max_steps=2)
    assert results and all(math.isfinite(v) for r in results for v in r.metrics.values())
    best = m.best()
    assert best.spec["family"] == "toy_resnet"
    assert within_budget(best.spec, ctx.spec, ctx.budget, ctx.input_size)
