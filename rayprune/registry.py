"""A tiny name -> object registry with errors that list the known names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import RaypruneError, did_you_mean, hint, unknown_name

# The name helpers live in errors.py (they word errors); importers of this module find them here too.
__all__ = ["Registry", "UnknownNameError", "did_you_mean", "hint", "unknown_name"]

T = TypeVar("T")


# A KeyError too: a registry is a mapping, and callers of ``get`` may catch a missing name as one.
class UnknownNameError(RaypruneError, KeyError):
    """Raised for a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects. Duplicate registration is a programming error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        raise UnknownNameError(unknown_name(self.kind, name, sorted(self._items)))

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
