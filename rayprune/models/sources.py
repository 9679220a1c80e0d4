"""Where a user's network comes from: a *source* string resolved to a factory.

A source is one of

* ``torchvision:NAME``: a classification builder of :mod:`torchvision.models`, built with
  ``num_classes`` and ``weights=None`` (nothing downloads);
* ``path/to/file.py:FACTORY``: a function in a Python file (stored as an absolute path);
* ``package.module:FACTORY``: a function in an importable module.

``FACTORY(num_classes=N, **options)`` returns an ``nn.Module``.

A sweep driver ships a file source to its Ray workers in a folder named by
:func:`shipped_folder` (``runtime_env`` ``py_modules``), so a worker on another node, where the
path does not exist, imports the driver's copy of the file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .base import SpecError

Factory = Callable[..., nn.Module]
TORCHVISION = "torchvision:"
SHIPPED_PREFIX = "rayprune_src_"


def is_source(model: str) -> bool:
    """True when ``model`` names a traced source rather than a registered family."""
    head, sep, factory = model.rpartition(":")
    if not sep or not head or not factory:
        return False
    if model.startswith(TORCHVISION) or head.endswith(".py") or "." in head:
        return True
    # A bare name is a module only when one is importable (else it is a misspelt family).
    return head.isidentifier() and importlib.util.find_spec(head) is not None


def absolute_source(source: str) -> str:
    """``source`` with a ``file.py`` path made absolute (other sources unchanged)."""
    head, _, factory = source.rpartition(":")
    if head.endswith(".py") and not source.startswith(TORCHVISION):
        return f"{Path(head).expanduser().resolve()}:{factory}"
    return source


def factory_of(source: str) -> Factory:
    """The callable a source names; :class:`SpecError` in one line when it cannot be found."""
    head, _, name = source.rpartition(":")
    if source.startswith(TORCHVISION):
        return _torchvision_builder(source[len(TORCHVISION) :])
    module = _file_module(head) if head.endswith(".py") else _imported_module(head)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SpecError(
            f"model {source!r}: {head} defines no function {name!r}; give FILE.py:FACTORY or MODULE:FACTORY"
        )
    return factory


def _torchvision_builder(name: str) -> Factory:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name not in names:
        from ..errors import did_you_mean

        raise SpecError(f"model 'torchvision:{name}': no such classification model{did_you_mean(name, names)}")

    def build(num_classes: int, **options: Any) -> nn.Module:
        return tvm.get_model(name, weights=None, num_classes=num_classes, **options)

    return build


def shipped_folder(path: str) -> str:
    """The name of the folder a sweep ships the file ``path`` (absolute) to its Ray workers in."""
    return SHIPPED_PREFIX + hashlib.sha1(path.encode()).hexdigest()[:12]


def located(path: str) -> Path:
    """The file a source's ``path`` names here: the copy a sweep shipped to this Ray worker (on
    ``sys.path``, see :func:`shipped_folder`) when there is one, else the path itself."""
    folder, name = shipped_folder(path), Path(path).name
    for entry in sys.path:
        copy = Path(entry or ".") / folder / name
        if copy.is_file():
            return copy
    return Path(path)


def _file_module(path: str) -> Any:
    file = located(path)
    if not file.is_file():
        raise SpecError(f"model file {path!r} does not exist; give the path of a Python file")
    key = f"rayprune_user_{shipped_folder(str(Path(path).resolve()))}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, file)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[key]
        raise SpecError(f"model file {path!r} failed to import: {type(e).__name__}: {e}") from None
    return module


def _imported_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise SpecError(
            f"model module {name!r} cannot be imported ({e}); put it on PYTHONPATH or give FILE.py:FACTORY"
        ) from None


def build_source(source: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    """The unpruned network of a source; a factory that fails or returns no module is refused."""
    factory = factory_of(source)
    try:
        model = factory(num_classes=num_classes, **options)
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"model {source!r}: its factory failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model {source!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model
