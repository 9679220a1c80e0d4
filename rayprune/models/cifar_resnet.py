"""CIFAR ResNets (He et al. 2016): basic-block ResNet-20/32/44/56/110 and bottleneck ResNet-164.

Spec (fixed; other tools read it)::

    {"family": "cifar_resnet", "block": "basic", "num_classes": 10, "shortcut": "option_a",
     "stem": 16, "stages": [[[mid, out], ...], [...], [...]]}

* a basic block is ``[mid, out]``; a bottleneck block is ``[mid1, mid2, out]``;
* a block's input width is the previous block's output (the stem's for the very first block);
* the first block of stages 2 and 3 has stride 2; a stage may have any number of blocks (>= 1);
* shortcut: a stride-2 block uses the spec's ``shortcut`` kind (``option_a``: parameter-free
  subsample + zero-pad; ``avgpool_conv``: AvgPool2d(2) then a 1x1 conv without BN, as in TAS;
  ``conv_bn``: 1x1 stride-2 conv + BN). A stride-1 block whose input and output widths differ
  uses a 1x1 conv + BN (so does the first block of a bottleneck net, always). Otherwise the
  identity.

Post-activation blocks: relu(bn(conv)) ... bn(conv_last), add the shortcut, then relu.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .analytic import Layer, bn_layer, conv_layer
from .base import Axes, Fixup, ResidualBlock, ResidualNet, Spec, SpecError, StageSplit, bn_axes, init_weights
from .checks import check_fields, require_choice
from .residual import ResidualFamily, StageBlock, validate_block_stages

SHORTCUTS = ("option_a", "avgpool_conv", "conv_bn")
DEPTHS = {"20": 3, "32": 5, "44": 7, "56": 9, "110": 18}  # basic blocks per stage
BOTTLENECK_DEPTHS = {"164": 18}
# The tiny preset used by tests everywhere: 2 basic blocks per stage, widths 8/16/32.
TINY: dict[str, Any] = {"blocks": 2, "widths": (8, 16, 32)}


@dataclass(frozen=True)
class BlockInfo(StageBlock):
    shortcut: str  # "identity" | "option_a" | "avgpool_conv" | "conv_bn" | "conv_bn_s1"

    @property
    def prefix(self) -> str:
        return f"stages.{self.stage}.{self.index}"

    @property
    def identity(self) -> bool:
        return self.shortcut == "identity"


def iter_blocks(spec: Spec) -> Iterator[BlockInfo]:
    """Walk the blocks with their derived input width, stride and shortcut kind."""
    cin = spec["stem"]
    for s, stage in enumerate(spec["stages"]):
        for b, widths in enumerate(stage):
            stride = 2 if (s > 0 and b == 0) else 1
            cout = widths[-1]
            if stride == 2:
                kind = spec["shortcut"]
            elif cin != cout or (s == 0 and b == 0 and spec["block"] == "bottleneck"):
                # The bottleneck net's first block always expands (16 -> 64), so it always has a
                # projection; keeping it structural means pruning never adds or removes modules.
                kind = "conv_bn_s1"
            else:
                kind = "identity"
            yield BlockInfo(s, b, stride, cin, tuple(widths), kind)
            cin = cout


class OptionA(nn.Module):
    """He et al.'s parameter-free shortcut: subsample by 2, zero-pad channels (half each side)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.front = (cout - cin) // 2
        self.back = cout - cin - self.front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.front, self.back))


class AvgPoolConv(nn.Module):
    """TAS's stride-2 shortcut: AvgPool2d(2) then a 1x1 conv without BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def make_shortcut(kind: str, cin: int, cout: int, stride: int) -> nn.Module | None:
    if kind == "identity":
        return None
    if kind == "option_a":
        return OptionA(cin, cout)
    if kind == "avgpool_conv":
        return AvgPoolConv(cin, cout)
    return ConvBN(cin, cout, 1, stride)  # conv_bn (stride 2) and conv_bn_s1


class Block(nn.Module):
    """Basic (2 convs) or bottleneck (1x1, 3x3, 1x1) post-activation residual block."""

    def __init__(self, info: BlockInfo) -> None:
        super().__init__()
        if len(info.widths) == 2:
            mid, out = info.widths
            self.conv1 = nn.Conv2d(info.cin, mid, 3, info.stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out)
            self.convs = 2
        else:
            m1, m2, out = info.widths
            self.conv1 = nn.Conv2d(info.cin, m1, 1, 1, 0, bias=False)
            self.bn1 = nn.BatchNorm2d(m1)
            self.conv2 = nn.Conv2d(m1, m2, 3, info.stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(m2)
            self.conv3 = nn.Conv2d(m2, out, 1, 1, 0, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
            self.convs = 3
        self.shortcut = make_shortcut(info.shortcut, info.cin, info.cout, info.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        if self.convs == 2:
            y = self.bn2(self.conv2(y))
        else:
            y = F.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + s)


class CifarResNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.stem = ConvBN(3, spec["stem"], 3)
        stages: list[list[Block]] = [[] for _ in spec["stages"]]
        for info in iter_blocks(spec):
            stages[info.stage].append(Block(info))
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        last = spec["stages"][-1][-1][-1]
        self.fc = nn.Linear(last, spec["num_classes"])
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CifarResNetFamily(ResidualFamily[BlockInfo]):
    name = "cifar_resnet"
    default_input_size = 32
    stem = ("stem.conv", "stem.bn")

    def variants(self) -> list[str]:
        return [*DEPTHS, *BOTTLENECK_DEPTHS, "tiny"]

    def full_spec(self, variant: str, num_classes: int = 10, shortcut: str = "option_a", **options: Any) -> Spec:
        if options:
            raise SpecError(f"cifar_resnet: unknown options {sorted(options)}; known: shortcut")
        if variant in DEPTHS or variant == "tiny":
            n, widths = (DEPTHS[variant], (16, 32, 64)) if variant != "tiny" else (TINY["blocks"], TINY["widths"])
            stages = [[[w, w] for _ in range(n)] for w in widths]
            block = "basic"
        elif variant in BOTTLENECK_DEPTHS:
            n = BOTTLENECK_DEPTHS[variant]
            stages = [[[w, w, 4 * w] for _ in range(n)] for w in (16, 32, 64)]
            block = "bottleneck"
        else:
            raise SpecError(f"cifar_resnet: unknown variant {variant!r}; known: {', '.join(self.variants())}")
        spec = {
            "family": "cifar_resnet",
            "block": block,
            "num_classes": num_classes,
            "shortcut": shortcut,
            "stem": 16 if variant != "tiny" else TINY["widths"][0],
            "stages": stages,
        }
        self.validate(spec)
        return spec

    def validate(self, spec: Spec) -> None:
        check_fields(
            spec,
            {"family", "block", "num_classes", "shortcut", "stem", "stages"},
            ("block", "num_classes", "shortcut", "stem", "stages"),
        )
        require_choice(spec["shortcut"], SHORTCUTS, "shortcut")
        validate_block_stages(spec)

    def build(self, spec: Spec) -> nn.Module:
        self.validate(spec)
        return CifarResNet(spec)

    def stem_layers(self, spec: Spec, input_size: int) -> tuple[list[Layer], tuple[int, int]]:
        conv, bn = self.stem
        hw = (input_size, input_size)
        return [conv_layer(conv, 3, spec["stem"], 3, 1, hw), bn_layer(bn, spec["stem"], hw)], hw

    def blocks(self, spec: Spec) -> Iterator[BlockInfo]:
        return iter_blocks(spec)

    def shortcut_layers(self, info: BlockInfo, hw: tuple[int, int], input_size: int) -> list[Layer]:
        p = info.prefix
        if info.shortcut == "avgpool_conv":
            if hw[0] % 2 or hw[1] % 2:
                raise SpecError(f"input_size {input_size}: avgpool_conv shortcuts need even feature maps")
            return [conv_layer(f"{p}.shortcut.conv", info.cin, info.cout, 1, 1, (hw[0] // 2, hw[1] // 2))]
        if info.shortcut in ("conv_bn", "conv_bn_s1"):
            sc = conv_layer(f"{p}.shortcut.conv", info.cin, info.cout, 1, info.stride, hw, padding=0)
            return [sc, bn_layer(f"{p}.shortcut.bn", info.cout, sc.out_hw)]
        return []

    def shortcut_axes(self, info: BlockInfo, in_group: str, out_group: str) -> dict[str, Axes]:
        axes: dict[str, Axes] = {}
        if info.shortcut in ("avgpool_conv", "conv_bn", "conv_bn_s1"):
            axes[f"{info.prefix}.shortcut.conv.weight"] = (out_group, in_group, None, None)
        if info.shortcut in ("conv_bn", "conv_bn_s1"):
            axes.update(bn_axes(f"{info.prefix}.shortcut.bn", out_group))
        return axes

    # -- super-net hooks -------------------------------------------------------------------------
    def residual_net(self, spec: Spec) -> ResidualNet:
        """3x3 stem; TAS's stride-2 shortcut (AvgPool(2) + 1x1 conv, no BN) in the search and in
        every genotype; a 1x1 conv + BN where a stride-1 block changes width."""
        spec = {**spec, "shortcut": "avgpool_conv"}
        blocks = []
        for info in iter_blocks(spec):
            convs = info.conv_names()
            if info.shortcut == "identity":
                blocks.append(ResidualBlock(info.stage, convs))
            else:  # avgpool_conv (stride 2) or conv_bn_s1 (only where the unpruned net has one)
                pooled = info.shortcut == "avgpool_conv"
                blocks.append(ResidualBlock(info.stage, convs, f"{info.prefix}.shortcut.conv", pooled, not pooled))
        return ResidualNet(spec, self.stem[0], False, tuple(blocks), "per_block")

    def stage_split(self, spec: Spec, model: nn.Module) -> StageSplit:
        """One stage per resolution (the stem goes with the first); the classifier with the last."""
        model = cast(CifarResNet, model)  # built from this family's spec
        group_of = self.group_of(spec)
        n = len(spec["stages"])

        def stage(s: int) -> Callable[[torch.Tensor], torch.Tensor]:
            return (lambda x: model.stages[0](F.relu(model.stem(x)))) if s == 0 else model.stages[s]

        fixups, prev = {}, "stem"
        for info in iter_blocks(spec):
            out = f"s{info.stage}.b{info.index}.out"
            if info.shortcut == "option_a":
                fixups[f"{info.prefix}.shortcut"] = _option_a_fixup(group_of[prev], group_of[out])
            prev = out
        modules = [[model.stem, model.stages[0]], *[[model.stages[s]] for s in range(1, n)]]
        modules[-1].append(model.fc)
        return StageSplit(
            stages=[stage(s) for s in range(n)],
            head=lambda x: model.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)),
            modules=modules,
            boundary=[group_of[f"s{s}.b{len(spec['stages'][s]) - 1}.out"] for s in range(n)],
            fixups=fixups,
        )


def _option_a_fixup(in_group: str, out_group: str) -> Fixup:
    """Option-A shortcuts zero-pad by position: recompute them at the subnet's widths."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, widths: dict[str, int]) -> torch.Tensor:
        k_in, k_out = widths[in_group], widths[out_group]
        front = (k_out - k_in) // 2  # as OptionA(k_in, k_out) in the sliced subnet (may crop)
        sub = F.pad(inputs[0][:, :k_in, ::2, ::2], (0, 0, 0, 0, front, k_out - k_in - front))
        return F.pad(sub, (0, 0, 0, 0, 0, output.shape[1] - k_out))

    return hook
