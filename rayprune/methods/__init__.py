"""Pruning methods behind :class:`rayprune.methods.base.Method`.

:data:`MODULES` is the one registration of the methods shipped here: each name (what users type)
and the module of this package whose :class:`Method` subclass declares that ``name``.
``get_method("ast")`` imports ``rayprune.methods.ast_search`` on first use, so a method's module is
only loaded when it is asked for. A method kept outside this package registers itself with
:func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..registry import Registry, UnknownNameError, unknown_name
from .base import Budget, FinalResult, Method, MethodHparams, RunContext, StepResult, SubnetRecord, within_budget

#: The methods shipped here: name -> module of this package that defines the class with that ``name``.
MODULES: dict[str, str] = {
    "ast": "ast_search",
    "tas": "tas",
    "sp": "sp",
    "uniform": "uniform",
    "l1": "l1",
    "fpgm": "fpgm",
    "random": "random_search",
}
#: The method classes loaded so far, and those registered from outside this package.
METHODS: Registry[type[Method]] = Registry("method")


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator for a method kept outside this package: ``@register("mine")`` names the
    class and lets :func:`get_method` find it. The methods shipped here are in :data:`MODULES`."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in MODULES:
            raise ValueError(f"method {name!r} is one of rayprune's own; register yours under another name")
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (imports its module on first use)."""
    if name not in METHODS and name in MODULES:
        METHODS.add(name, _class_in(MODULES[name], name))
    if name not in METHODS:
        raise UnknownNameError(unknown_name("method", name, MODULES))
    return METHODS.get(name)


def _class_in(module: str, name: str) -> type[Method]:
    """The :class:`Method` subclass of ``rayprune.methods.<module>`` that declares ``name = <name>``."""
    namespace = vars(importlib.import_module(f"{__name__}.{module}"))
    found = [
        obj
        for obj in namespace.values()
        if isinstance(obj, type) and issubclass(obj, Method) and vars(obj).get("name") == name
    ]
    if len(found) != 1:
        raise TypeError(f"{__name__}.{module} must define one Method subclass with name = {name!r}; found {len(found)}")
    return found[0]


__all__ = [
    "METHODS",
    "MODULES",
    "Budget",
    "FinalResult",
    "Method",
    "MethodHparams",
    "RunContext",
    "StepResult",
    "SubnetRecord",
    "get_method",
    "register",
    "within_budget",
]
