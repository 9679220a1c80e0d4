"""CIFAR VGG with batch norm (VGG-11/13/16/19-BN) and a single linear classifier.

Spec::

    {"family": "vgg", "num_classes": 10,
     "stages": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]}

* ``stages`` is a list of stages; a stage is the list of its 3x3 conv widths (depth = the number of
  convs) and ends with a 2x2 max-pool (``ceil_mode``, so small inputs such as 8x8 digits still work);
* every conv is ``conv3x3 (no bias) -> BN -> ReLU``; after the last stage a global average pool
  (a no-op at 32x32, where the map is already 1x1) feeds ONE linear layer ``last width -> num_classes``;
* optional ``input_size``: the natural input resolution (default 32).

Channel groups: every conv's width is its own group ``s{stage}.c{conv}`` (kind "inner"; its
stage is the index of the max-pool block it belongs to).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .analytic import Layer, bn_layer, conv_layer, linear_layer
from .base import Axes, ChannelGroup, Family, Spec, SpecError, bn_axes, init_weights
from .checks import check_fields, require, require_int, validate_input_size
from .cifar_resnet import ConvBN

CONFIGS = {
    "11": (1, 1, 2, 2, 2),
    "13": (2, 2, 2, 2, 2),
    "16": (2, 2, 3, 3, 3),
    "19": (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)
# The tiny preset for fast tests: one conv per stage.
TINY_WIDTHS = (8, 16, 16, 32, 32)
FIELDS = {"family", "num_classes", "stages", "input_size"}


def pooled(size: int) -> int:
    """Output size of MaxPool2d(2, ceil_mode=True)."""
    return -(-size // 2)


def conv_name(stage: int, index: int) -> str:
    return f"stages.{stage}.{index}"


def group_name(stage: int, index: int) -> str:
    return f"s{stage}.c{index}"


class VGG(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        stages, cin = [], 3
        for widths in spec["stages"]:
            blocks = []
            for w in widths:
                blocks.append(ConvBN(cin, w, 3))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, spec["num_classes"])
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in cast("Iterable[nn.Sequential]", self.stages):
            for block in stage:
                x = F.relu(block(x))
            x = F.max_pool2d(x, 2, ceil_mode=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGGFamily(Family):
    name = "vgg"
    default_input_size = 32

    def variants(self) -> list[str]:
        return [*CONFIGS, "tiny"]

    def full_spec(self, variant: str, num_classes: int = 10, **options: Any) -> Spec:
        if options:
            raise SpecError(f"vgg: unknown options {sorted(options)}; vgg takes none")
        if variant == "tiny":
            stages = [[w] for w in TINY_WIDTHS]
        elif variant in CONFIGS:
            stages = [[w] * n for w, n in zip(WIDTHS, CONFIGS[variant], strict=True)]
        else:
            raise SpecError(f"vgg: unknown variant {variant!r}; known: {', '.join(self.variants())}")
        spec = {"family": "vgg", "num_classes": num_classes, "stages": stages}
        self.validate(spec)
        return spec

    def validate(self, spec: Spec) -> None:
        check_fields(spec, FIELDS, ("num_classes", "stages"))
        require_int(spec["num_classes"], "num_classes")
        validate_input_size(spec)
        stages = spec["stages"]
        require(isinstance(stages, list) and len(stages) >= 1, "stages", "must be a non-empty list of stages")
        for s, stage in enumerate(stages):
            require(
                isinstance(stage, list) and len(stage) >= 1,
                f"stages[{s}]",
                f"must be a non-empty list of conv widths (a stage keeps at least one conv), got {stage!r}",
            )
            for c, w in enumerate(stage):
                require_int(w, f"stages[{s}][{c}]")

    def build(self, spec: Spec) -> nn.Module:
        self.validate(spec)
        return VGG(spec)

    def layers(self, spec: Spec, input_size: int) -> list[Layer]:
        self.validate(spec)
        hw, cin, out = (input_size, input_size), 3, []
        for s, widths in enumerate(spec["stages"]):
            for c, w in enumerate(widths):
                conv = conv_layer(f"{conv_name(s, c)}.conv", cin, w, 3, 1, hw)
                out += [conv, bn_layer(f"{conv_name(s, c)}.bn", w, hw)]
                cin = w
            hw = (pooled(hw[0]), pooled(hw[1]))
        out.append(linear_layer("fc", cin, spec["num_classes"]))
        return out

    def channel_groups(self, spec: Spec) -> list[ChannelGroup]:
        self.validate(spec)
        return [
            ChannelGroup(name=group_name(s, c), width=w, stage=s, kind="inner", members=(f"stages.{s}.{c}",))
            for s, widths in enumerate(spec["stages"])
            for c, w in enumerate(widths)
        ]

    def tensor_axes(self, spec: Spec) -> dict[str, Axes]:
        self.validate(spec)
        axes: dict[str, Axes] = {}
        prev: str | None = None
        for s, widths in enumerate(spec["stages"]):
            for c in range(len(widths)):
                g, p = group_name(s, c), conv_name(s, c)
                axes[f"{p}.conv.weight"] = (g, prev, None, None)
                axes.update(bn_axes(f"{p}.bn", g))
                prev = g
        axes["fc.weight"] = (None, prev)
        axes["fc.bias"] = (None,)
        return axes
