"""Pretrained starts: the unpruned net's weights from a state_dict file or torchvision's cache.

``source`` is a path to a ``state_dict`` file (loaded with ``weights_only=True``), or
``torchvision:DEFAULT`` / ``torchvision:ResNet18_Weights.IMAGENET1K_V1`` for a
``torchvision:NAME`` model: the file torchvision would download, taken from the local torch hub
cache only (nothing downloads; a missing file is one line naming it and the folder it goes in).
A classifier head whose shape differs (other classes) keeps its fresh initialisation, and
:func:`apply_weights` says so; any other missing, unexpected or misshapen key is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import RaypruneError
from . import layers
from .base import Spec
from .sources import TORCHVISION


class WeightsError(RaypruneError):
    """Weights that cannot start the network: the message names the file or key and the fix."""


def apply_weights(net: nn.Module, spec: Spec, source: str) -> str | None:
    """Load ``source`` into ``net`` (built from ``spec``, unpruned) in place. Returns a note when
    the classifier head was re-initialised, else None."""
    state = dict(read_weights(spec, source))
    own = net.state_dict()
    head = _head(spec)
    for key in [*own, *state]:
        if key not in state:
            raise WeightsError(f"weights {source}: no tensor for {key!r}; give the state_dict of this model")
        if key not in own:
            raise WeightsError(f"weights {source}: unexpected key {key!r}; give the state_dict of this model")
    renewed = []
    for key, mine in own.items():
        theirs = state[key]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape:
            shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            if head is None or not key.startswith(f"{head}."):
                raise WeightsError(
                    f"weights {source}: {key!r} has shape {shape}, the model {tuple(mine.shape)}; "
                    "give the state_dict of this model"
                )
            state[key] = mine
            renewed.append(key)
    net.load_state_dict(state)
    if not renewed:
        return None
    return (
        f"the classifier head {head!r} does not fit {spec['num_classes']} classes in weights {source}: re-initialised"
    )


def read_weights(spec: Spec, source: str) -> Mapping[str, torch.Tensor]:
    """The state_dict ``source`` names (see the module docstring)."""
    path = _hub_file(spec, source) if source.startswith(TORCHVISION) else Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist; give a state_dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"weights file {str(path)!r} is not a state_dict torch loads safely ({e})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} holds no state_dict (a mapping of names to tensors)")
    return state


def _hub_file(spec: Spec, source: str) -> Path:
    import torchvision.models as tvm

    model = spec.get("source", "")
    if spec.get("family") != "traced" or not model.startswith(TORCHVISION):
        raise WeightsError(f"weights {source}: torchvision weights need a torchvision:NAME model; give a file")
    name, wanted = model[len(TORCHVISION) :], source[len(TORCHVISION) :]
    try:
        weights = tvm.get_model_weights(name).DEFAULT if wanted == "DEFAULT" else tvm.get_weight(wanted)
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(f"weights {source}: not a torchvision weights name ({e}); try torchvision:DEFAULT") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not file.is_file():
        raise WeightsError(
            f"weights {source}: {file.name} is not in the local torch hub cache; put it (from {weights.url}) "
            f"into {file.parent}"
        )
    return file


def _head(spec: Spec) -> str | None:
    """The classifier: the last conv or linear layer of the walk."""
    producing = [layer.name for layer in layers(spec) if layer.kind != "bn"]
    return producing[-1] if producing else None
