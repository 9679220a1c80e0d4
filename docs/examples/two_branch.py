"""A small user network for rayprune's traced family (see docs/own-models.md).

Two branches joined by a concatenation, a grouped conv and a linear head: ``two_branch`` is the
factory, called as ``two_branch(num_classes=N)``.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class TwoBranch(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(3, width)
        self.left = conv_bn(width, width, stride=2)
        self.right = conv_bn(width, width // 2, kernel=1, stride=2)
        self.mix = conv_bn(width + width // 2, 2 * width, kernel=1)
        self.grouped = conv_bn(2 * width, 2 * width, groups=4)
        self.deep = conv_bn(2 * width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        x = self.deep(self.grouped(self.mix(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def two_branch(num_classes: int = 10, width: int = 16) -> nn.Module:
    return TwoBranch(num_classes, width)
