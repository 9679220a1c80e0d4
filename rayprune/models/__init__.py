"""Model families as JSON specs: build, analytic MACs/params, channel groups, weight transfer.

Typical use::

    from rayprune import models
    spec = models.full_spec("cifar_resnet:56")          # the unpruned net, as data
    net = models.build(spec)                             # an ordinary nn.Module
    models.macs(spec), models.params(spec)               # analytic, no forward pass
    pruned = models.with_widths(spec, {"s0.b0.mid": 8})  # a subnet is a spec too
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import Registry, UnknownNameError
from .analytic import Layer
from .base import (
    Axes,
    ChannelGroup,
    Family,
    ResidualBlock,
    ResidualNet,
    Spec,
    SpecError,
    StageSplit,
    WidthSlot,
    canonical_json,
    round_to,
    spec_hash,
)
from .cifar_resnet import CifarResNetFamily
from .mobilenet_v2 import MobileNetV2Family
from .resnet import ResNetFamily
from .sources import absolute_source, is_source
from .traced import TracedFamily
from .vgg import VGGFamily

FAMILIES: Registry[Family] = Registry("model family")
for _family in (CifarResNetFamily(), VGGFamily(), MobileNetV2Family(), ResNetFamily(), TracedFamily()):
    FAMILIES.add(_family.name, _family)
del _family

__all__ = [
    "FAMILIES",
    "Axes",
    "ChannelGroup",
    "Family",
    "Layer",
    "ResidualBlock",
    "ResidualNet",
    "Spec",
    "SpecError",
    "StageSplit",
    "WidthSlot",
    "absolute_source",
    "build",
    "canonical_json",
    "channel_groups",
    "family_of",
    "full_spec",
    "input_size_of",
    "is_source",
    "layers",
    "load_spec",
    "macs",
    "params",
    "parse_model",
    "round_to",
    "save_spec",
    "spec_hash",
    "tensor_axes",
    "validate",
    "with_widths",
]


def family_of(spec: Spec) -> Family:
    """The family object for a spec (by its ``family`` field)."""
    if not isinstance(spec, dict):
        raise SpecError(f"a spec must be a JSON object, got {type(spec).__name__}")
    if "family" not in spec:
        raise SpecError(f"spec field 'family' is required; known families: {', '.join(FAMILIES.names())}")
    try:
        return FAMILIES.get(spec["family"])
    except UnknownNameError as e:
        raise SpecError(f"spec field 'family': {e}") from None


def parse_model(model: str) -> tuple[Family, str]:
    """Split "family:variant" (e.g. "cifar_resnet:56") into the family and variant.

    A model string that names no registered family but a source (``torchvision:NAME``,
    ``file.py:FACTORY``, ``package.module:FACTORY``) is the traced family's variant.
    """
    fam, _, variant = model.partition(":")
    if fam not in FAMILIES.names() and is_source(model):
        return FAMILIES.get(TracedFamily.name), model
    try:
        family = FAMILIES.get(fam)
    except UnknownNameError as e:
        raise SpecError(f"{e}; or give torchvision:NAME, FILE.py:FACTORY or MODULE:FACTORY") from None
    if not variant:
        raise SpecError(f"model {model!r}: expected FAMILY:VARIANT, variants of {fam}: {', '.join(family.variants())}")
    return family, variant


def full_spec(model: str, num_classes: int = 10, input_size: int | None = None, **options: Any) -> Spec:
    """The unpruned spec for "family:variant" or a traced source (``torchvision:resnet18``).

    ``input_size`` is the side a traced source is traced at (its stages follow the resolutions
    there); the registered families carry their own size hint and ignore it.
    """
    family, variant = parse_model(model)
    if input_size is not None and isinstance(family, TracedFamily):
        options["input_size"] = input_size
    return family.full_spec(variant, num_classes=num_classes, **options)


def validate(spec: Spec) -> Spec:
    """``spec`` if it is a valid spec of its family, else :class:`SpecError` naming the field."""
    family = family_of(spec)
    try:
        family.validate(spec)
    except SpecError:
        raise
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:  # a shape no check foresaw
        raise SpecError(
            f"malformed {family.name} spec ({e}); compare it with the format in the README or "
            f"`rayprune inspect` a full spec"
        ) from None
    return spec


def build(spec: Spec, seed: int | None = None) -> nn.Module:
    """Build an ordinary (randomly initialised) nn.Module from a spec.

    With ``seed`` the initial weights depend on it alone and the global RNG is left untouched.
    """
    family = family_of(spec)
    if seed is None:
        return family.build(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(spec)


def input_size_of(spec: Spec, input_size: int | None = None) -> int:
    """Explicit size, else the spec's own ``input_size`` hint, else the family default.

    Raises:
        SpecError: an explicit ``input_size`` that is not an integer >= 1.
    """
    if input_size is not None:
        if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
            raise SpecError(f"input_size must be an integer >= 1, got {input_size!r}")
        return input_size
    return spec.get("input_size") or family_of(spec).default_input_size


def layers(spec: Spec, input_size: int | None = None) -> list[Layer]:
    """The analytic per-layer walk (conv, linear, bn) at ``input_size`` (family default if None)."""
    return family_of(spec).layers(spec, input_size_of(spec, input_size))


def macs(spec: Spec, input_size: int | None = None) -> int:
    """Multiply-accumulates of convs and linears (what pruning papers call FLOPs)."""
    return sum(layer.macs for layer in layers(spec, input_size))


def params(spec: Spec) -> int:
    """Learnable parameters (conv/linear weights and biases, BN affine), as sum(p.numel())."""
    return sum(layer.params for layer in layers(spec))


def channel_groups(spec: Spec) -> list[ChannelGroup]:
    return family_of(spec).channel_groups(spec)


def tensor_axes(spec: Spec) -> dict[str, Axes]:
    return family_of(spec).tensor_axes(spec)


def with_widths(spec: Spec, widths: dict[str, int]) -> Spec:
    """A copy of ``spec`` with channel groups resized (see :func:`channel_groups` for names)."""
    return family_of(spec).with_widths(spec, widths)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec JSON file; errors name the file and the problem."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        hint = " (a saved subnet folder: pass its spec.json)" if (path / "spec.json").is_file() else ""
        raise SpecError(f"spec file {str(path)!r} is a directory{hint}; give the path of a spec JSON file") from None
    except UnicodeDecodeError:
        raise SpecError(
            f"spec file {str(path)!r} is not text (a binary file such as weights.pt?); give the path "
            "of a spec JSON file (a saved subnet's spec.json)"
        ) from None
    except json.JSONDecodeError as e:
        raise SpecError(f"spec file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except OSError as e:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {e.strerror or e}") from None
    return validate(spec)


def save_spec(spec: Spec, path: str | Path) -> None:
    Path(path).write_text(json.dumps(spec, indent=1) + "\n")
