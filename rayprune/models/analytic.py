"""Analytic per-layer entries: the MACs and parameters of convs, linears and BNs, counted from
their shapes without a forward pass (a family's :meth:`~rayprune.models.base.Family.layers`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Layer:
    """One analytically counted layer (conv, linear or bn)."""

    name: str  # module path in the built model, e.g. "stages.1.0.conv1"
    kind: str  # "conv" | "linear" | "bn"
    in_channels: int
    out_channels: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    bias: bool = False
    out_hw: tuple[int, int] = (1, 1)
    macs: int = 0
    params: int = 0
    bias_macs: int = 0  # part of ``macs`` that FlopCounterMode does not see

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_hw"] = list(self.out_hw)
        return d


def conv_layer(
    name: str,
    cin: int,
    cout: int,
    k: int,
    stride: int,
    hw: tuple[int, int],
    groups: int = 1,
    bias: bool = False,
    padding: int | None = None,
) -> Layer:
    """A conv's analytic entry: k*k*(cin/groups)*cout*H_out*W_out (+ cout*H_out*W_out bias)."""
    pad = k // 2 if padding is None else padding
    h = (hw[0] + 2 * pad - k) // stride + 1
    w = (hw[1] + 2 * pad - k) // stride + 1
    core = k * k * (cin // groups) * cout * h * w
    bias_macs = cout * h * w if bias else 0
    params = k * k * (cin // groups) * cout + (cout if bias else 0)
    return Layer(name, "conv", cin, cout, k, stride, groups, bias, (h, w), core + bias_macs, params, bias_macs)


def linear_layer(name: str, cin: int, cout: int, bias: bool = True) -> Layer:
    """A linear layer's entry: in*out (+ out for the bias)."""
    bias_macs = cout if bias else 0
    return Layer(
        name,
        "linear",
        cin,
        cout,
        bias=bias,
        macs=cin * cout + bias_macs,
        params=cin * cout + bias_macs,
        bias_macs=bias_macs,
    )


def bn_layer(name: str, c: int, hw: tuple[int, int]) -> Layer:
    """BatchNorm: no MACs (convention), 2*C learnable params."""
    return Layer(name, "bn", c, c, out_hw=hw, params=2 * c)
