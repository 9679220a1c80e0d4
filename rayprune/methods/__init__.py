"""Pruning methods, one file each, behind :class:`rayprune.methods.base.Method`.

``get_method("ast")`` imports ``rayprune.methods.ast`` on first use, so a method's module is only
loaded when it is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..registry import Registry, UnknownNameError, unknown_name
from .base import Budget, FinalResult, Method, MethodHparams, RunContext, StepResult, SubnetRecord, within_budget

# name -> module in this package (the module registers its class under the name)
MODULES = {"ast": "ast", "tas": "tas", "sp": "sp", "uniform": "uniform", "l1": "l1", "fpgm": "fpgm", "random": "random"}
METHODS: Registry[type[Method]] = Registry("method")


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator used by each method module: ``@register("tas")``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (imports its module on first use)."""
    if name not in METHODS and name in MODULES:
        importlib.import_module(f"{__name__}.{MODULES[name]}")
    if name not in METHODS:
        raise UnknownNameError(unknown_name("method", name, MODULES))
    return METHODS.get(name)


__all__ = [
    "METHODS",
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
