"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout, for ImageNet (224) and CIFAR (32).

Spec::

    {"family": "mobilenet_v2", "num_classes": 1000, "input_size": 224, "stem": 32, "stem_stride": 2,
     "stages": [{"out": 16, "stride": 1, "hidden": [null]},
                {"out": 24, "stride": 2, "hidden": [96, 144]}, ...],
     "last": 1280, "dropout": 0.2}

* stem: 3x3 conv (stride ``stem_stride``) + BN + ReLU6;
* a stage is ``{"out", "stride", "hidden"}``: one inverted-residual block per entry of ``hidden``
  (depth = ``len(hidden)``), all with output width ``out``; the first block has stride ``stride``,
  the others stride 1 and an identity residual (so the stage's blocks share one output width);
* a block is ``1x1 expand (hidden) + BN + ReLU6 -> 3x3 depthwise (stride) + BN + ReLU6 -> 1x1
  project (out) + BN`` (linear bottleneck); a ``null`` hidden width means "no expansion conv"
  (expansion ratio 1: the depthwise runs on the block input, as in the first torchvision block);
* then ``last``: 1x1 conv + BN + ReLU6, global average pool, Dropout(``dropout``), one linear layer;
* ``input_size``: the natural input resolution (224 ImageNet, 32 CIFAR); analytic counts take the
  input size explicitly and fall back to it.

A stage's first block never has a residual (in torchvision it has one only when stride is 1 and
the widths match, which never happens for the standard nets), so the structure does not change
when widths are pruned. State-dict keys equal torchvision's ``mobilenet_v2`` (``features.*``,
``classifier.1``), so torchvision weights load into the unpruned 1.0 spec.

Variants: ImageNet width multipliers "1.4", "1.0", "0.75", "0.5", "0.35" (channels rounded to
multiples of 8 with :func:`round_to`, last conv ``1280 * max(1, mult)``); "cifar", "cifar_0.75",
"cifar_0.5" follow the common CIFAR convention (kuangliu/pytorch-cifar): stem stride 1 and the
second stage (24 channels) stride 1 instead of 2, so a 32x32 input ends at 4x4; "tiny" is a
3-stage CIFAR-layout net for fast tests.

Channel groups (all with divisor 8): ``stem``; ``s{i}.b{j}.hidden`` per expanding block (kind
"inner"); ``s{i}.out`` per stage (kind "residual": shared by the stage's blocks); ``last``.
The group's stage is the inverted-residual stage index (stem: 0, last: the last stage).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .analytic import Layer, bn_layer, conv_layer, linear_layer
from .base import Axes, ChannelGroup, Family, Spec, SpecError, StageSplit, bn_axes, init_weights, round_to
from .checks import check_fields, require, require_int, validate_input_size

DIVISOR = 8
# torchvision's inverted-residual settings: (expansion t, channels c, blocks n, stride s).
IMAGENET_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
CIFAR_SETTINGS = tuple((t, c, n, 1 if i == 1 else s) for i, (t, c, n, s) in enumerate(IMAGENET_SETTINGS))
TINY_SETTINGS = ((1, 8, 1, 1), (3, 16, 2, 2), (3, 24, 2, 2))
MULTIPLIERS = ("1.4", "1.0", "0.75", "0.5", "0.35")
CIFAR_VARIANTS = {"cifar": 1.0, "cifar_0.75": 0.75, "cifar_0.5": 0.5}
FIELDS = {"family", "num_classes", "input_size", "stem", "stem_stride", "stages", "last", "dropout"}
STAGE_FIELDS = ("out", "stride", "hidden")


@dataclass(frozen=True)
class BlockInfo:
    stage: int
    index: int
    feature: int  # index in ``features`` (the stem is 0)
    stride: int
    cin: int
    hidden: int | None  # None: no expansion conv
    cout: int

    @property
    def residual(self) -> bool:
        return self.index > 0

    @property
    def prefix(self) -> str:
        return f"features.{self.feature}.conv"


def iter_blocks(spec: Spec) -> Iterator[BlockInfo]:
    cin, feature = spec["stem"], 1
    for s, stage in enumerate(spec["stages"]):
        for b, hidden in enumerate(stage["hidden"]):
            yield BlockInfo(s, b, feature, stage["stride"] if b == 0 else 1, cin, hidden, stage["out"])
            cin, feature = stage["out"], feature + 1


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation with ReLU6: keys ``.0`` (conv) and ``.1`` (BN)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)
    )


class InvertedResidual(nn.Module):
    def __init__(self, info: BlockInfo) -> None:
        super().__init__()
        hidden = info.cin if info.hidden is None else info.hidden
        layers: list[nn.Module] = []
        if info.hidden is not None:
            layers.append(conv_bn_act(info.cin, hidden, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, info.stride, groups=hidden),
            nn.Conv2d(hidden, info.cout, 1, bias=False),
            nn.BatchNorm2d(info.cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = info.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        features: list[nn.Module] = [conv_bn_act(3, spec["stem"], 3, spec["stem_stride"])]
        features += [InvertedResidual(info) for info in iter_blocks(spec)]
        features.append(conv_bn_act(spec["stages"][-1]["out"], spec["last"], 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(spec.get("dropout", 0.2)), nn.Linear(spec["last"], spec["num_classes"])
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def spec_from_settings(
    settings: tuple[tuple[int, int, int, int], ...],
    mult: float,
    *,
    num_classes: int,
    input_size: int,
    stem: int,
    stem_stride: int,
    last: int,
) -> Spec:
    """torchvision's width rule: round every width (times ``mult``) to a multiple of 8; a block's
    hidden width is ``round(input width * t)``."""
    cin = round_to(stem * mult, DIVISOR)
    spec: Spec = {
        "family": "mobilenet_v2",
        "num_classes": num_classes,
        "input_size": input_size,
        "stem": cin,
        "stem_stride": stem_stride,
        "stages": [],
    }
    for t, c, n, s in settings:
        out = round_to(c * mult, DIVISOR)
        hidden = []
        for _ in range(n):
            hidden.append(None if t == 1 else round(cin * t))
            cin = out
        spec["stages"].append({"out": out, "stride": s, "hidden": hidden})
    spec["last"] = round_to(last * max(1.0, mult), DIVISOR)
    spec["dropout"] = 0.2
    return spec


class MobileNetV2Family(Family):
    name = "mobilenet_v2"
    default_input_size = 224

    def variants(self) -> list[str]:
        return [*MULTIPLIERS, *CIFAR_VARIANTS, "tiny"]

    def full_spec(self, variant: str, num_classes: int = 1000, **options: Any) -> Spec:
        if options:
            raise SpecError(f"mobilenet_v2: unknown options {sorted(options)}; mobilenet_v2 takes none")
        common = {"num_classes": num_classes, "stem": 32, "last": 1280}
        if variant in MULTIPLIERS:
            spec = spec_from_settings(IMAGENET_SETTINGS, float(variant), input_size=224, stem_stride=2, **common)
        elif variant in CIFAR_VARIANTS:
            spec = spec_from_settings(CIFAR_SETTINGS, CIFAR_VARIANTS[variant], input_size=32, stem_stride=1, **common)
        elif variant == "tiny":
            spec = spec_from_settings(
                TINY_SETTINGS, 1.0, num_classes=num_classes, input_size=32, stem=8, stem_stride=1, last=64
            )
        else:
            raise SpecError(f"mobilenet_v2: unknown variant {variant!r}; known: {', '.join(self.variants())}")
        self.validate(spec)
        return spec

    def validate(self, spec: Spec) -> None:
        check_fields(spec, FIELDS, ("num_classes", "stem", "stem_stride", "stages", "last"))
        for key in ("num_classes", "stem", "last"):
            require_int(spec[key], key)
        require_stride(spec["stem_stride"], "stem_stride")
        validate_input_size(spec)
        if "dropout" in spec:
            p = spec["dropout"]
            require(
                isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1,
                "dropout",
                f"must be a number in [0, 1), got {p!r}",
            )
        stages = spec["stages"]
        require(isinstance(stages, list) and len(stages) >= 1, "stages", "must be a non-empty list of stages")
        for s, stage in enumerate(stages):
            self._validate_stage(stage, f"stages[{s}]")

    @staticmethod
    def _validate_stage(stage: Any, where: str) -> None:
        require(isinstance(stage, dict), where, f"must be an object {{'out', 'stride', 'hidden'}}, got {stage!r}")
        check_fields(stage, set(STAGE_FIELDS), STAGE_FIELDS, where=f"{where}.")
        require_int(stage["out"], f"{where}.out")
        require_stride(stage["stride"], f"{where}.stride")
        hidden = stage["hidden"]
        require(
            isinstance(hidden, list) and len(hidden) >= 1,
            f"{where}.hidden",
            "must be a non-empty list of hidden widths (null = no expansion conv); a stage keeps >= 1 block",
        )
        for b, h in enumerate(hidden):
            if h is not None:
                require_int(h, f"{where}.hidden[{b}]")

    def build(self, spec: Spec) -> nn.Module:
        self.validate(spec)
        return MobileNetV2(spec)

    def layers(self, spec: Spec, input_size: int) -> list[Layer]:
        self.validate(spec)
        stem = conv_layer("features.0.0", 3, spec["stem"], 3, spec["stem_stride"], (input_size, input_size))
        out = [stem, bn_layer("features.0.1", spec["stem"], stem.out_hw)]
        hw = stem.out_hw
        for info in iter_blocks(spec):
            out += block_layers(info, hw)
            hw = out[-1].out_hw
        n = len(list(iter_blocks(spec))) + 1
        last = conv_layer(f"features.{n}.0", spec["stages"][-1]["out"], spec["last"], 1, 1, hw)
        out += [
            last,
            bn_layer(f"features.{n}.1", spec["last"], hw),
            linear_layer("classifier.1", spec["last"], spec["num_classes"]),
        ]
        return out

    def channel_groups(self, spec: Spec) -> list[ChannelGroup]:
        self.validate(spec)

        def group(name: str, width: int, stage: int, kind: str, path: str) -> ChannelGroup:
            return ChannelGroup(
                name=name,
                width=width,
                stage=stage,
                kind=kind,
                min_width=min(DIVISOR, width),
                divisor=DIVISOR,
                members=(path,),
            )

        groups = [group("stem", spec["stem"], 0, "inner", "stem")]
        for s, stage in enumerate(spec["stages"]):
            for b, h in enumerate(stage["hidden"]):
                if h is not None:
                    groups.append(group(f"s{s}.b{b}.hidden", h, s, "inner", f"stages.{s}.hidden.{b}"))
            groups.append(group(f"s{s}.out", stage["out"], s, "residual", f"stages.{s}.out"))
        groups.append(group("last", spec["last"], len(spec["stages"]) - 1, "inner", "last"))
        return groups

    def tensor_axes(self, spec: Spec) -> dict[str, Axes]:
        self.validate(spec)
        axes: dict[str, Axes] = {"features.0.0.weight": ("stem", None, None, None), **bn_axes("features.0.1", "stem")}
        prev, n = "stem", 0
        for info in iter_blocks(spec):
            out_g = f"s{info.stage}.out"
            hid_g = prev if info.hidden is None else f"s{info.stage}.b{info.index}.hidden"
            j = 0
            if info.hidden is not None:
                axes[f"{info.prefix}.0.0.weight"] = (hid_g, prev, None, None)
                axes.update(bn_axes(f"{info.prefix}.0.1", hid_g))
                j = 1
            axes[f"{info.prefix}.{j}.0.weight"] = (hid_g, None, None, None)  # depthwise: one input per group
            axes.update(bn_axes(f"{info.prefix}.{j}.1", hid_g))
            axes[f"{info.prefix}.{j + 1}.weight"] = (out_g, hid_g, None, None)
            axes.update(bn_axes(f"{info.prefix}.{j + 2}", out_g))
            prev, n = out_g, info.feature
        axes[f"features.{n + 1}.0.weight"] = ("last", prev, None, None)
        axes.update(bn_axes(f"features.{n + 1}.1", "last"))
        axes["classifier.1.weight"] = (None, "last")
        axes["classifier.1.bias"] = (None,)
        return axes

    # -- super-net hooks -------------------------------------------------------------------------
    def stage_split(self, spec: Spec, model: nn.Module) -> StageSplit:
        """Stages start at the stride-2 inverted-residual stages (the first one is skipped when the
        stem already downsamples, so stride 2 and 4 share a stage, as SP's split at resolution
        changes has it); the last 1x1 conv is a stage of its own (the head group); pooling and
        the classifier go with it."""
        model = cast(MobileNetV2, model)  # built from this family's spec
        blocks = list(iter_blocks(spec))
        strided = [s for s, stage in enumerate(spec["stages"]) if stage["stride"] == 2]
        strided = strided[1:] if spec["stem_stride"] == 2 else strided
        head_at = len(model.features) - 1
        starts = [0, *[b.feature for b in blocks if b.index == 0 and b.stage in strided], head_at]
        out_group = {0: "stem", **{b.feature: f"s{b.stage}.out" for b in blocks}}
        modules: list[list[nn.Module]] = [[model.features[a:b]] for a, b in itertools.pairwise(starts)]
        modules.append([model.features[head_at:], model.classifier])
        return StageSplit(
            stages=[m[0] for m in modules],
            head=lambda x: model.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)),
            modules=modules,
            boundary=[out_group[b - 1] for b in starts[1:]] + ["last"],
            fixups={},
        )


def require_stride(value: Any, field_name: str) -> None:
    require(type(value) is int and value in (1, 2), field_name, f"must be 1 or 2, got {value!r}")


def block_layers(info: BlockInfo, hw: tuple[int, int]) -> list[Layer]:
    """Analytic entries of one inverted residual; the last entry's ``out_hw`` is its output size."""
    p, out = info.prefix, []
    hidden, j = info.cin, 0
    if info.hidden is not None:
        hidden, j = info.hidden, 1
        expand = conv_layer(f"{p}.0.0", info.cin, hidden, 1, 1, hw)
        out += [expand, bn_layer(f"{p}.0.1", hidden, hw)]
    dw = conv_layer(f"{p}.{j}.0", hidden, hidden, 3, info.stride, hw, groups=hidden)
    project = conv_layer(f"{p}.{j + 1}", hidden, info.cout, 1, 1, dw.out_hw)
    return [
        *out,
        dw,
        bn_layer(f"{p}.{j}.1", hidden, dw.out_hw),
        project,
        bn_layer(f"{p}.{j + 2}", info.cout, dw.out_hw),
    ]
