"""ImageNet ResNets in torchvision's layout: ResNet-18/34 (basic) and ResNet-50/101/152 (bottleneck).

Spec (the same shape as ``cifar_resnet``, without a shortcut kind)::

    {"family": "resnet", "block": "bottleneck", "num_classes": 1000, "stem": 64,
     "stages": [[[64, 64, 256], [64, 64, 256], [64, 64, 256]], [[128, 128, 512], ...], ...]}

* a basic block is ``[mid, out]``, a bottleneck block ``[mid1, mid2, out]``; a stage may have any
  number of blocks (>= 1) and there may be any number of stages (ImageNet nets have 4);
* stem: 7x7 stride-2 conv + BN + ReLU, then a 3x3 stride-2 max-pool; stage ``s > 0`` halves the
  resolution in its first block (in the 3x3 conv for bottlenecks: "V1.5");
* shortcuts (the ``cifar_resnet`` rule): the first block of a stage has a 1x1 conv + BN
  ``downsample`` (with the block's stride) whenever ``s > 0`` or the block is a bottleneck, whatever
  its widths (torchvision's choice for the standard nets); any other block whose output width
  differs from its input width has a stride-1 1x1 conv + BN ``downsample`` projection (searched
  genotypes, e.g. TAS's, have independent residual widths); every other block has an identity;
* global average pool, then one linear layer; optional ``input_size`` (default 224).

State-dict keys equal torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc``), so torchvision ResNet weights load into an unpruned spec.

Channel groups: an identity shortcut ties a block's output to its input, a ``downsample`` starts a
new residual group named after its block's output: ``stem`` (stage 0; for basic blocks it also holds
stage 0's block outputs), ``s{s}.b{b}.out`` (kind "residual"; in a standard net ``s{s}.b0.out``, the
output width shared by every block of the stage), and each block's inner widths ``s{s}.b{b}.mid``
(basic) or ``.mid1``/``.mid2`` (bottleneck; kind "inner"). Group-based pruning of a standard net
therefore never adds or removes a ``downsample`` (tied widths stay equal). Caveat: pruning the two
groups around a stride-1 projection to equal widths removes it (as in ``cifar_resnet``); such
projections only occur in searched genotypes, which are trained from scratch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .analytic import Layer, bn_layer, conv_layer
from .base import Axes, ResidualBlock, ResidualNet, Spec, SpecError, bn_axes, init_weights
from .checks import check_fields, validate_input_size
from .residual import ResidualFamily, StageBlock, validate_block_stages

DEPTHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "18": ("basic", (2, 2, 2, 2)),
    "34": ("basic", (3, 4, 6, 3)),
    "50": ("bottleneck", (3, 4, 6, 3)),
    "101": ("bottleneck", (3, 4, 23, 3)),
    "152": ("bottleneck", (3, 8, 36, 3)),
}
PLANES = (64, 128, 256, 512)
# Tiny presets for fast tests: one block per stage, natural input 32.
TINY = {"tiny": ("basic", (8, 16, 16, 32)), "tiny_bottleneck": ("bottleneck", (4, 8, 8, 16))}
FIELDS = {"family", "block", "num_classes", "stem", "stages", "input_size"}


@dataclass(frozen=True)
class BlockInfo(StageBlock):
    downsample: bool  # a 1x1 conv + BN shortcut (else the identity)

    @property
    def prefix(self) -> str:
        return f"layer{self.stage + 1}.{self.index}"

    @property
    def identity(self) -> bool:
        return not self.downsample


def iter_blocks(spec: Spec) -> Iterator[BlockInfo]:
    """Walk the blocks with their input width, stride and whether they have a downsample."""
    cin = spec["stem"]
    bottleneck = spec["block"] == "bottleneck"
    for s, stage in enumerate(spec["stages"]):
        for b, widths in enumerate(stage):
            # The structural downsample (torchvision's) exists whatever the widths, so pruning a
            # standard net never removes it; elsewhere a width change needs a projection.
            structural = b == 0 and (s > 0 or bottleneck)
            yield BlockInfo(s, b, 2 if (b == 0 and s > 0) else 1, cin, tuple(widths), structural or cin != widths[-1])
            cin = widths[-1]


class Block(nn.Module):
    """torchvision's BasicBlock / Bottleneck with free inner widths."""

    def __init__(self, info: BlockInfo) -> None:
        super().__init__()
        w = info.widths
        if len(w) == 2:
            self.conv1 = nn.Conv2d(info.cin, w[0], 3, info.stride, 1, bias=False)
            self.conv2 = nn.Conv2d(w[0], w[1], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(info.cin, w[0], 1, bias=False)
            self.conv2 = nn.Conv2d(w[0], w[1], 3, info.stride, 1, bias=False)
            self.conv3 = nn.Conv2d(w[1], w[2], 1, bias=False)
        for j, width in enumerate(w):
            self.add_module(f"bn{j + 1}", nn.BatchNorm2d(width))
        self.convs = len(w)
        self.downsample = None
        if info.downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(info.cin, info.cout, 1, info.stride, bias=False), nn.BatchNorm2d(info.cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for j in range(1, self.convs + 1):
            y = getattr(self, f"bn{j}")(getattr(self, f"conv{j}")(y))
            if j < self.convs:
                y = F.relu(y)
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class ResNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, spec["stem"], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(spec["stem"])
        stages: list[list[Block]] = [[] for _ in spec["stages"]]
        for info in iter_blocks(spec):
            stages[info.stage].append(Block(info))
        self.num_stages = len(stages)
        for s, blocks in enumerate(stages):
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(spec["stages"][-1][-1][-1], spec["num_classes"])
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNetFamily(ResidualFamily[BlockInfo]):
    name = "resnet"
    default_input_size = 224
    stem = ("conv1", "bn1")

    def variants(self) -> list[str]:
        return [*DEPTHS, *TINY]

    def full_spec(self, variant: str, num_classes: int = 1000, **options: Any) -> Spec:
        if options:
            raise SpecError(f"resnet: unknown options {sorted(options)}; resnet takes none")
        if variant in DEPTHS:
            block, counts = DEPTHS[variant]
            planes, stem, extra = PLANES, 64, {}
        elif variant in TINY:
            block, planes = TINY[variant]
            counts, stem, extra = (1,) * len(planes), planes[0], {"input_size": 32}
        else:
            raise SpecError(f"resnet: unknown variant {variant!r}; known: {', '.join(self.variants())}")
        stages = [
            [[p, p, 4 * p] if block == "bottleneck" else [p, p] for _ in range(n)]
            for p, n in zip(planes, counts, strict=True)
        ]
        spec = {"family": "resnet", "block": block, "num_classes": num_classes, "stem": stem, "stages": stages, **extra}
        self.validate(spec)
        return spec

    def validate(self, spec: Spec) -> None:
        check_fields(spec, FIELDS, ("block", "num_classes", "stem", "stages"))
        validate_block_stages(spec)
        validate_input_size(spec)

    def build(self, spec: Spec) -> nn.Module:
        self.validate(spec)
        return ResNet(spec)

    def stem_layers(self, spec: Spec, input_size: int) -> tuple[list[Layer], tuple[int, int]]:
        conv, bn = self.stem
        stem = conv_layer(conv, 3, spec["stem"], 7, 2, (input_size, input_size))
        h, w = ((x + 2 - 3) // 2 + 1 for x in stem.out_hw)  # 3x3 stride-2 max-pool, padding 1
        return [stem, bn_layer(bn, spec["stem"], stem.out_hw)], (h, w)

    def blocks(self, spec: Spec) -> Iterator[BlockInfo]:
        return iter_blocks(spec)

    def shortcut_layers(self, info: BlockInfo, hw: tuple[int, int], input_size: int) -> list[Layer]:
        if not info.downsample:
            return []
        ds = conv_layer(f"{info.prefix}.downsample.0", info.cin, info.cout, 1, info.stride, hw, padding=0)
        return [ds, bn_layer(f"{info.prefix}.downsample.1", info.cout, ds.out_hw)]

    def shortcut_axes(self, info: BlockInfo, in_group: str, out_group: str) -> dict[str, Axes]:
        if not info.downsample:
            return {}
        return {
            f"{info.prefix}.downsample.0.weight": (out_group, in_group, None, None),
            **bn_axes(f"{info.prefix}.downsample.1", out_group),
        }

    # -- super-net hooks -------------------------------------------------------------------------
    def residual_net(self, spec: Spec) -> ResidualNet:
        """7x7 stride-2 stem + max-pool; torchvision's 1x1 conv + BN downsample; ImageNet depths."""
        blocks = tuple(
            ResidualBlock(
                info.stage,
                info.conv_names(),
                f"{info.prefix}.downsample.0" if info.downsample else None,
            )
            for info in iter_blocks(spec)
        )
        return ResidualNet(dict(spec), self.stem[0], True, blocks, "imagenet")
