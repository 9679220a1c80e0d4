"""Model families: exact reference MACs/params, spec validation, building, round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from rayprune import models
from rayprune.models import SpecError, round_to

# (model, num_classes, shortcut option, input size, MACs, params or None): the reference values of docs/specs.md.
REFERENCES = [
    ("cifar_resnet:20", 10, {"shortcut": "option_a"}, 32, 40_551_050, 269_722),
    ("cifar_resnet:32", 10, {"shortcut": "option_a"}, 32, 68_862_602, 464_154),
    ("cifar_resnet:56", 10, {"shortcut": "option_a"}, 32, 125_485_706, 853_018),
    ("cifar_resnet:110", 10, {"shortcut": "option_a"}, 32, 252_887_690, 1_727_962),
    ("cifar_resnet:56", 100, {"shortcut": "option_a"}, 32, 125_491_556, None),
    ("cifar_resnet:20", 10, {"shortcut": "avgpool_conv"}, 32, 40_813_194, 272_282),
    ("cifar_resnet:20", 100, {"shortcut": "avgpool_conv"}, 32, 40_819_044, 278_132),
    ("cifar_resnet:32", 10, {"shortcut": "avgpool_conv"}, 32, 69_124_746, 466_714),
    ("cifar_resnet:56", 10, {"shortcut": "avgpool_conv"}, 32, 125_747_850, 855_578),
    ("cifar_resnet:110", 10, {"shortcut": "avgpool_conv"}, 32, 253_149_834, 1_730_522),
    ("cifar_resnet:164", 10, {"shortcut": "avgpool_conv"}, 32, 247_646_730, 1_703_386),
    ("cifar_resnet:164", 100, {"shortcut": "avgpool_conv"}, 32, 247_669_860, 1_726_516),
    ("resnet:50", 1000, {}, 224, 4_089_185_256, 25_557_032),
    ("resnet:18", 1000, {}, 224, 1_814_074_344, 11_689_512),
    ("mobilenet_v2:1.0", 1000, {}, 224, 300_775_272, 3_504_872),
    ("vgg:16", 10, {}, 32, 313_201_674, 14_724_042),
    ("vgg:16", 100, {}, 32, 313_247_844, None),
]


@pytest.mark.parametrize(
    "model,classes,options,size,ref_macs,ref_params",
    REFERENCES,
    ids=[f"{r[0]}-{r[1]}-{'-'.join(r[2].values())}" for r in REFERENCES],
)
def test_reference_counts(model, classes, options, size, ref_macs, ref_params):
    spec = models.full_spec(model, num_classes=classes, **options)
    assert models.macs(spec, size) == ref_macs
    if ref_params is not None:
        assert models.params(spec) == ref_params


def test_ast_gap_is_two_shortcut_convs():
    """Option A and avgpool_conv differ by exactly the two stride-2 1x1 convs."""
    a = models.macs(models.full_spec("cifar_resnet:56", shortcut="option_a"))
    b = models.macs(models.full_spec("cifar_resnet:56", shortcut="avgpool_conv"))
    assert b - a == 16 * 32 * 16**2 + 32 * 64 * 8**2


def test_mobilenet_width_multipliers_match_torchvision():
    # Published MAC counts: 300 / 209 / 97 / 59 M for 1.0 / 0.75 / 0.5 / 0.35.
    for variant, mega in (("0.75", 209), ("0.5", 97), ("0.35", 59)):
        spec = models.full_spec(f"mobilenet_v2:{variant}", num_classes=1000)
        assert round(models.macs(spec, 224) / 1e6) == mega
        tv = torchvision.models.mobilenet_v2(width_mult=float(variant))
        assert models.params(spec) == sum(p.numel() for p in tv.parameters())


@pytest.mark.parametrize(
    "ours,theirs",
    [
        ("resnet:18", lambda: torchvision.models.resnet18()),
        ("resnet:50", lambda: torchvision.models.resnet50()),
        ("mobilenet_v2:1.0", lambda: torchvision.models.mobilenet_v2()),
    ],
)
def test_torchvision_weights_load_and_give_the_same_outputs(ours, theirs):
    spec = models.full_spec(ours, num_classes=1000)
    tv = theirs().eval()
    net = models.build(spec).eval()
    net.load_state_dict(tv.state_dict())  # strict: identical keys and shapes
    assert set(models.tensor_axes(spec)) == set(net.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "model,size",
    [
        ("cifar_resnet:tiny", 32),
        ("cifar_resnet:20", 16),
        ("vgg:tiny", 32),
        ("vgg:tiny", 8),
        ("vgg:11", 32),
        ("mobilenet_v2:tiny", 32),
        ("mobilenet_v2:cifar_0.5", 32),
        ("mobilenet_v2:0.35", 64),
        ("resnet:tiny", 32),
        ("resnet:tiny_bottleneck", 32),
        ("resnet:18", 64),
    ],
)
def test_build_output_shape_and_state_keys(model, size):
    spec = models.full_spec(model, num_classes=7)
    net = models.build(spec).eval()
    with torch.no_grad():
        assert net(torch.randn(3, 3, size, size)).shape == (3, 7)
    state = net.state_dict()
    axes = models.tensor_axes(spec)
    assert set(axes) == set(state)
    widths = {g.name: g.width for g in models.channel_groups(spec)}
    for key, groups in axes.items():
        for dim, g in enumerate(groups):
            if g is not None:
                assert state[key].shape[dim] == widths[g], (key, dim)


def test_layer_names_are_module_paths():
    for model in ("vgg:tiny", "mobilenet_v2:tiny", "resnet:tiny_bottleneck", "resnet:tiny"):
        spec = models.full_spec(model)
        modules = dict(models.build(spec).named_modules())
        for layer in models.layers(spec, 32):
            assert layer.name in modules, layer.name
            m = modules[layer.name]
            assert (layer.in_channels, layer.out_channels) == (
                (m.in_channels, m.out_channels)
                if layer.kind == "conv"
                else (m.in_features, m.out_features)
                if layer.kind == "linear"
                else (m.num_features,) * 2
            )


def test_default_variants_and_groups():
    assert models.full_spec("vgg:16")["stages"] == [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3]
    assert len(models.full_spec("vgg:19")["stages"][4]) == 4
    groups = models.channel_groups(models.full_spec("vgg:16"))
    assert len(groups) == 13 and {g.kind for g in groups} == {"inner"}
    assert [g.stage for g in groups] == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]

    r18 = {g.name: g for g in models.channel_groups(models.full_spec("resnet:18"))}
    # Stage 0 of a basic-block ResNet has identity shortcuts: its outputs are tied to the stem.
    assert r18["stem"].members == ("stem", "stages.0.0.1", "stages.0.1.1")
    assert r18["s1.b0.out"].members == ("stages.1.0.1", "stages.1.1.1") and r18["s1.b0.out"].kind == "residual"
    assert r18["s3.b1.mid"].kind == "inner" and len(r18) == 1 + 3 + 8
    r50 = {g.name: g for g in models.channel_groups(models.full_spec("resnet:50"))}
    assert r50["stem"].members == ("stem",) and r50["s0.b0.out"].width == 256
    assert r50["s2.b5.mid2"].stage == 2 and len(r50) == 1 + 4 + 2 * 16

    mb = {g.name: g for g in models.channel_groups(models.full_spec("mobilenet_v2:1.0", num_classes=1000))}
    assert "s0.b0.hidden" not in mb  # the first block has no expansion conv
    assert mb["s1.b1.hidden"].width == 144 and mb["s1.b1.hidden"].kind == "inner"
    assert mb["s3.out"].width == 64 and mb["s3.out"].kind == "residual"
    assert mb["last"].width == 1280 and mb["last"].stage == 6
    assert all(g.divisor == 8 for g in mb.values())


def test_resnet_width_change_gets_a_projection_that_unties_the_groups():
    spec = models.full_spec("resnet:tiny")  # stem 8, one [w, w] block per stage, widths 8/16/16/32
    spec["stem"] = 5  # stage 0's first block: 5 -> 8, no structural downsample (basic block)
    spec["stages"][2].append([16, 12])  # a second stride-1 block: 16 -> 12
    models.validate(spec)
    net = models.build(spec)
    assert net.layer1[0].downsample[0].weight.shape == (8, 5, 1, 1) and net.layer1[0].downsample[0].stride == (1, 1)
    assert net.layer3[1].downsample[0].weight.shape == (12, 16, 1, 1)
    assert net.layer3[0].downsample[0].stride == (2, 2)  # the structural one is unchanged
    groups = {g.name: g for g in models.channel_groups(spec)}
    assert groups["stem"].members == ("stem",)
    assert groups["s0.b0.out"].members == ("stages.0.0.1",) and groups["s0.b0.out"].stage == 0
    assert groups["s2.b1.out"].members == ("stages.2.1.1",) and groups["s2.b1.out"].kind == "residual"
    axes = models.tensor_axes(spec)
    assert axes["layer3.1.downsample.0.weight"] == ("s2.b1.out", "s2.b0.out", None, None)
    assert axes["layer4.0.conv1.weight"] == ("s3.b0.mid", "s2.b1.out", None, None)
    assert set(axes) == set(net.state_dict())
    # 1x1 projections at the post-max-pool resolution 8x8 (input 32) and at 2x2 in stage 2.
    by_name = {layer.name: layer for layer in models.layers(spec, 32)}
    assert by_name["layer1.0.downsample.0"].macs == 5 * 8 * 8 * 8
    assert by_name["layer3.1.downsample.0"].macs == 16 * 12 * 2 * 2


def test_cifar_mobilenet_removes_the_early_strides():
    spec = models.full_spec("mobilenet_v2:cifar")
    assert spec["stem_stride"] == 1 and spec["input_size"] == 32
    assert [s["stride"] for s in spec["stages"]] == [1, 1, 2, 2, 1, 2, 1]
    imagenet = models.full_spec("mobilenet_v2:1.0", num_classes=10)
    assert [s["stride"] for s in imagenet["stages"]] == [1, 2, 2, 2, 1, 2, 1]
    last_conv = [layer for layer in models.layers(spec, 32) if layer.kind == "conv"][-1]
    assert last_conv.out_hw == (4, 4)


# ---------------------------------------------------------------------------------------------
# Validation: every error names the bad field
# ---------------------------------------------------------------------------------------------


def _mutate(model, change):
    spec = models.full_spec(model)
    change(spec)
    return spec


BAD_SPECS = [
    ("vgg:tiny", lambda s: s.update(stages=[]), "'stages'"),
    ("vgg:tiny", lambda s: s["stages"].__setitem__(2, []), "'stages[2]'"),
    ("vgg:tiny", lambda s: s["stages"][1].__setitem__(0, 0), "'stages[1][0]'"),
    ("vgg:tiny", lambda s: s["stages"][1].__setitem__(0, 8.0), "'stages[1][0]'"),
    ("vgg:tiny", lambda s: s.update(num_classes="10"), "'num_classes'"),
    ("vgg:tiny", lambda s: s.update(width=3), "'width'"),
    ("vgg:tiny", lambda s: s.pop("stages"), "'stages'"),
    ("vgg:tiny", lambda s: s.update(input_size=0), "'input_size'"),
    ("resnet:tiny", lambda s: s.update(block="wide"), "'block'"),
    ("resnet:tiny", lambda s: s.update(stem=True), "'stem'"),
    ("resnet:tiny", lambda s: s["stages"][1].__setitem__(0, [8, 8, 8]), "'stages[1][0]'"),
    ("resnet:tiny", lambda s: s["stages"].__setitem__(3, []), "'stages[3]'"),
    ("resnet:tiny", lambda s: s["stages"][1].append([16, 0]), "'stages[1][1][1]'"),
    ("resnet:tiny", lambda s: s.update(shortcut="option_a"), "'shortcut'"),
    ("mobilenet_v2:tiny", lambda s: s.update(stem_stride=3), "'stem_stride'"),
    ("mobilenet_v2:tiny", lambda s: s.update(last=0), "'last'"),
    ("mobilenet_v2:tiny", lambda s: s.update(dropout=1.0), "'dropout'"),
    ("mobilenet_v2:tiny", lambda s: s["stages"].__setitem__(1, [16, 2]), "'stages[1]'"),
    ("mobilenet_v2:tiny", lambda s: s["stages"][1].pop("out"), "'stages[1].out'"),
    ("mobilenet_v2:tiny", lambda s: s["stages"][1].update(stride=4), "'stages[1].stride'"),
    ("mobilenet_v2:tiny", lambda s: s["stages"][1].update(stride=True), "'stages[1].stride'"),
    ("mobilenet_v2:tiny", lambda s: s["stages"][1].update(hidden=[]), "'stages[1].hidden'"),
    ("mobilenet_v2:tiny", lambda s: s["stages"][2]["hidden"].__setitem__(1, -8), "'stages[2].hidden[1]'"),
    ("mobilenet_v2:tiny", lambda s: s["stages"][0].update(expand=6), "'stages[0].expand'"),
    ("cifar_resnet:tiny", lambda s: s.update(shortcut="option_b"), "'shortcut'"),
    ("cifar_resnet:tiny", lambda s: s["stages"][0].__setitem__(1, [8]), "'stages[0][1]'"),
]


@pytest.mark.parametrize("model,change,field", BAD_SPECS, ids=[f"{m}-{f}" for m, _, f in BAD_SPECS])
def test_validation_names_the_field(model, change, field):
    spec = _mutate(model, change)
    with pytest.raises(SpecError, match="spec field " + field.replace("[", r"\[").replace("]", r"\]")):
        models.validate(spec)
    with pytest.raises(SpecError):
        models.build(spec)


def test_unknown_family_and_variant_list_known_names():
    with pytest.raises(SpecError, match=r"known:.*cifar_resnet.*mobilenet_v2.*resnet.*vgg"):
        models.full_spec("alexnet:1")
    with pytest.raises(SpecError, match="known: 11, 13, 16, 19, tiny"):
        models.full_spec("vgg:17")
    with pytest.raises(SpecError, match="known: 18, 34, 50, 101, 152, tiny, tiny_bottleneck"):
        models.full_spec("resnet:20")
    with pytest.raises(SpecError, match=r"known: 1.4, 1.0, 0.75, 0.5, 0.35, cifar, cifar_0.75, cifar_0.5, tiny"):
        models.full_spec("mobilenet_v2:2.0")
    with pytest.raises(SpecError, match="variants of resnet: 18"):
        models.full_spec("resnet")
    with pytest.raises(SpecError, match="known families: "):
        models.validate({"stages": []})
    with pytest.raises(SpecError, match="unknown options"):
        models.full_spec("vgg:16", shortcut="option_a")


def test_round_to():
    assert round_to(32 * 0.35, 8) == 16  # 8 would be more than 10% below 11.2
    assert round_to(24 * 0.75, 8) == 24  # 16 < 0.9 * 18
    assert round_to(35, 8) == 32 and round_to(36, 8) == 40  # nearest multiple (ties round up)
    assert round_to(8.8, 8) == 8 and round_to(9, 8) == 16  # 8 is within 10% of 8.8, not of 9
    assert round_to(3, 8) == 8  # never below the divisor
    assert round_to(1280 * 1.4, 8) == 1792
    assert round_to(2.4) == 2 and round_to(0.2) == 1 and round_to(7.6, 1) == 8


def test_spec_json_round_trip(tmp_path):
    for model in ("vgg:16", "resnet:50", "mobilenet_v2:cifar", "cifar_resnet:tiny"):
        spec = models.full_spec(model)
        path = tmp_path / f"{model.replace(':', '_')}.json"
        models.save_spec(spec, path)
        loaded = models.load_spec(path)
        assert loaded == spec and models.spec_hash(loaded) == models.spec_hash(spec)
        assert models.macs(loaded, 32) == models.macs(spec, 32)


def test_load_spec_rejects_a_bad_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"family": "vgg", "num_classes": 10, "stages": [[8, "x"]]}))
    with pytest.raises(SpecError, match=r"stages\[0\]\[1\]"):
        models.load_spec(path)


def test_with_widths_sets_every_member_and_keeps_the_original():
    spec = models.full_spec("resnet:18")
    pruned = models.with_widths(spec, {"stem": 40, "s2.b1.mid": 100})
    assert pruned["stem"] == 40 and [b[1] for b in pruned["stages"][0]] == [40, 40]
    assert pruned["stages"][2][1] == [100, 256]
    assert spec["stem"] == 64  # a copy
    models.validate(pruned)

    mb = models.full_spec("mobilenet_v2:tiny")
    pruned = models.with_widths(mb, {"s1.out": 8, "s2.b1.hidden": 16, "last": 24})
    assert pruned["stages"][1]["out"] == 8 and pruned["stages"][2]["hidden"] == [48, 16] and pruned["last"] == 24
    assert models.build(pruned).features[-1][0].weight.shape == (24, 24, 1, 1)

    vgg = models.with_widths(models.full_spec("vgg:16"), {"s4.c2": 10})
    assert vgg["stages"][4] == [512, 512, 10]
    assert models.build(vgg).fc.in_features == 10

    with pytest.raises(SpecError, match=r"unknown channel group 's9.c0'"):
        models.with_widths(models.full_spec("vgg:tiny"), {"s9.c0": 4})
    with pytest.raises(SpecError, match="width must be an integer >= 1"):
        models.with_widths(models.full_spec("vgg:tiny"), {"s0.c0": 0})


def test_pruning_reduces_macs_by_the_hand_computed_amount():
    spec = models.full_spec("vgg:tiny")  # widths 8/16/16/32/32, one conv per stage
    pruned = models.with_widths(spec, {"s1.c0": 10})
    # conv s1.c0 at 16x16 (8 -> 16 becomes 8 -> 10) and conv s2.c0 at 8x8 (16 -> 16 becomes 10 -> 16)
    saved = 9 * 8 * 6 * 16 * 16 + 9 * 6 * 16 * 8 * 8
    assert models.macs(spec, 32) - models.macs(pruned, 32) == saved
    assert models.params(spec) - models.params(pruned) == 9 * 8 * 6 + 2 * 6 + 9 * 6 * 16


def test_input_size_hint_is_optional():
    spec = models.full_spec("vgg:tiny")
    models.validate({**spec, "input_size": 64})
    assert models.full_spec("resnet:tiny")["input_size"] == 32
    assert models.full_spec("mobilenet_v2:0.5")["input_size"] == 224


def test_default_input_size_comes_from_the_spec_hint():
    spec = models.full_spec("mobilenet_v2:cifar")
    assert models.macs(spec) == models.macs(spec, 32)
