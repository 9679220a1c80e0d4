"""What the two ResNet families (``cifar_resnet``, ``resnet``) share: their spec layout and the
channel groups their shortcuts tie.

The layout is ``{"block": "basic"|"bottleneck", "num_classes": n, "stem": w, "stages": [[[w, ...],
...], ...]}``: a stage is a list of blocks, a block the list of its conv widths (``[mid, out]`` or
``[mid1, mid2, out]``). A family walks its blocks as :class:`StageBlock` records; an identity
shortcut ties a block's output channels to its input's, a projection starts a new residual group
named after the block's output.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .analytic import Layer, bn_layer, conv_layer, linear_layer
from .base import Axes, ChannelGroup, Family, Spec, WidthSlot, bn_axes
from .checks import require, require_choice, require_int

BLOCKS = {"basic": 2, "bottleneck": 3}


@dataclass(frozen=True)
class StageBlock:
    """One block of the walk: where it sits, its stride, its input width and its conv widths.

    A basic block is two 3x3 convs (the first strided), a bottleneck block 1x1, 3x3 (strided), 1x1.
    """

    stage: int
    index: int
    stride: int
    cin: int
    widths: tuple[int, ...]  # [mid, out] or [mid1, mid2, out]

    @property
    def cout(self) -> int:
        return self.widths[-1]

    @property
    def prefix(self) -> str:
        """The block's module path in the built model."""
        raise NotImplementedError

    @property
    def identity(self) -> bool:
        """Whether the shortcut is the identity (it ties the output's channels to the input's)."""
        raise NotImplementedError

    def tensor(self, j: int) -> str:
        """Name of the activation after conv ``j`` (0-based) of this block."""
        n = len(self.widths)
        if j == n - 1:
            return f"s{self.stage}.b{self.index}.out"
        return f"s{self.stage}.b{self.index}.mid" + (str(j + 1) if n == 3 else "")

    def conv_names(self) -> tuple[str, ...]:
        """Layer names of the block's convs (``<prefix>.conv1``, ...), in forward order."""
        return tuple(f"{self.prefix}.conv{j + 1}" for j in range(len(self.widths)))

    def convs(self) -> list[tuple[int, int, int, int]]:
        """``(cin, cout, kernel, stride)`` of each conv of the block, in forward order."""
        kernels: tuple[int, ...]
        strides: tuple[int, ...]
        if len(self.widths) == 2:
            kernels, strides = (3, 3), (self.stride, 1)
        else:
            kernels, strides = (1, 3, 1), (1, self.stride, 1)
        cins = (self.cin, *self.widths[:-1])
        return list(zip(cins, self.widths, kernels, strides, strict=True))


def validate_block_stages(spec: Spec) -> None:
    """The checks of the layout: block kind, classes, stem and the ``stages`` list of per-block
    width lists (each error names the field)."""
    require_choice(spec["block"], BLOCKS, "block")
    require_int(spec["num_classes"], "num_classes")
    require_int(spec["stem"], "stem")
    stages = spec["stages"]
    require(isinstance(stages, list) and len(stages) >= 1, "stages", "must be a non-empty list of stages")
    per_block = BLOCKS[spec["block"]]
    for s, stage in enumerate(stages):
        require(
            isinstance(stage, list) and len(stage) >= 1,
            f"stages[{s}]",
            "must be a non-empty list of blocks (a stage keeps at least one block)",
        )
        for b, widths in enumerate(stage):
            where = f"stages[{s}][{b}]"
            require(
                isinstance(widths, list) and len(widths) == per_block,
                where,
                f"a {spec['block']} block is a list of {per_block} widths "
                f"({'[mid, out]' if per_block == 2 else '[mid1, mid2, out]'}), got {widths!r}",
            )
            for j, w in enumerate(widths):
                require_int(w, f"{where}[{j}]")


def conv_chain_layers(block: StageBlock, hw: tuple[int, int]) -> list[Layer]:
    """Analytic entries of a block's convs and BNs (not its shortcut), each conv followed by its BN;
    the last entry's ``out_hw`` is the block's output resolution."""
    out: list[Layer] = []
    for j, (name, (cin, cout, k, stride)) in enumerate(zip(block.conv_names(), block.convs(), strict=True)):
        conv = conv_layer(name, cin, cout, k, stride, hw)
        out += [conv, bn_layer(f"{block.prefix}.bn{j + 1}", cout, conv.out_hw)]
        hw = conv.out_hw
    return out


def conv_chain_axes(block: StageBlock, chain: Sequence[str]) -> dict[str, Axes]:
    """State-dict axes of a block's convs and BNs; ``chain`` is the channel group of the block's
    input, then of each conv's output."""
    axes: dict[str, Axes] = {}
    for j, name in enumerate(block.conv_names()):
        axes[f"{name}.weight"] = (chain[j + 1], chain[j], None, None)
        axes.update(bn_axes(f"{block.prefix}.bn{j + 1}", chain[j + 1]))
    return axes


@dataclass(frozen=True)
class Tensor:
    """An activation tensor of the walk and the channel group it belongs to."""

    name: str
    group: str
    stage: int
    kind: str  # "residual" or "inner"
    width: int
    path: str  # the spec field that sets its width


BlockT = TypeVar("BlockT", bound=StageBlock)


class ResidualFamily(Family, Generic[BlockT]):
    """A family of this layout. It declares its stem, block walk and shortcuts; the analytic walk,
    channel groups, state-dict axes, width slots and depths follow from them."""

    #: Layer names of the stem's conv and BN.
    stem: tuple[str, str]

    @abc.abstractmethod
    def blocks(self, spec: Spec) -> Iterator[BlockT]:
        """The block walk of ``spec``, in forward order."""

    @abc.abstractmethod
    def stem_layers(self, spec: Spec, input_size: int) -> tuple[list[Layer], tuple[int, int]]:
        """The stem's analytic entries and the resolution of the first block's input."""

    @abc.abstractmethod
    def shortcut_layers(self, block: BlockT, hw: tuple[int, int], input_size: int) -> list[Layer]:
        """Analytic entries of a block's shortcut (none for a parameter-free one); ``hw`` is the
        block's input resolution."""

    @abc.abstractmethod
    def shortcut_axes(self, block: BlockT, in_group: str, out_group: str) -> dict[str, Axes]:
        """State-dict axes of a block's shortcut (none for a parameter-free one)."""

    def layers(self, spec: Spec, input_size: int) -> list[Layer]:
        self.validate(spec)
        out, hw = self.stem_layers(spec, input_size)
        for block in self.blocks(spec):
            convs = conv_chain_layers(block, hw)
            out += convs + self.shortcut_layers(block, hw, input_size)
            hw = convs[-1].out_hw
        out.append(linear_layer("fc", spec["stages"][-1][-1][-1], spec["num_classes"]))
        return out

    def tensors(self, spec: Spec) -> list[Tensor]:
        """Every activation tensor in forward order, with its channel group."""
        out = [Tensor("stem", "stem", 0, "residual", spec["stem"], "stem")]
        residual = "stem"  # the group of the current block's input
        for block in self.blocks(spec):
            if not block.identity:
                residual = block.tensor(len(block.widths) - 1)
            for j, width in enumerate(block.widths):
                name = block.tensor(j)
                group, kind = (residual, "residual") if j == len(block.widths) - 1 else (name, "inner")
                out.append(Tensor(name, group, block.stage, kind, width, f"stages.{block.stage}.{block.index}.{j}"))
        return out

    def group_of(self, spec: Spec) -> dict[str, str]:
        """Tensor name (e.g. "s0.b1.out", "s2.b0.mid") -> the name of its channel group."""
        return {t.name: t.group for t in self.tensors(spec)}

    def channel_groups(self, spec: Spec) -> list[ChannelGroup]:
        self.validate(spec)
        members: dict[str, list[str]] = {}
        first: dict[str, Tensor] = {}
        for t in self.tensors(spec):
            members.setdefault(t.group, []).append(t.path)
            first.setdefault(t.group, t)
        return [
            ChannelGroup(name=g, width=first[g].width, stage=first[g].stage, kind=first[g].kind, members=tuple(paths))
            for g, paths in members.items()
        ]

    def tensor_axes(self, spec: Spec) -> dict[str, Axes]:
        self.validate(spec)
        group = self.group_of(spec)
        conv, bn = self.stem
        axes: dict[str, Axes] = {f"{conv}.weight": ("stem", None, None, None), **bn_axes(bn, "stem")}
        prev = "stem"
        for block in self.blocks(spec):
            chain = [prev, *(group[block.tensor(j)] for j in range(len(block.widths)))]
            axes.update(conv_chain_axes(block, chain))
            axes.update(self.shortcut_axes(block, prev, chain[-1]))
            prev = chain[-1]
        axes["fc.weight"] = (None, prev)
        axes["fc.bias"] = (None,)
        return axes

    def width_slots(self, spec: Spec) -> list[WidthSlot]:
        return width_slots(self.blocks(spec), self.stem[0])

    def with_depths(self, spec: Spec, depths: Sequence[int]) -> Spec:
        out = json.loads(json.dumps(spec))
        out["stages"] = [stage[:d] for stage, d in zip(out["stages"], depths, strict=True)]
        return out


def width_slots(blocks: Iterable[StageBlock], stem: str) -> list[WidthSlot]:
    """Width slots of the layout: the stem, then conv j of each block (``<prefix>.conv<j+1>``)."""
    slots = [WidthSlot("stem", stem, 0)]
    for block in blocks:
        slots += [
            WidthSlot(f"stages.{block.stage}.{block.index}.{j}", name, block.stage, block.index, j)
            for j, name in enumerate(block.conv_names())
        ]
    return slots
