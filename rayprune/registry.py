"""A tiny name -> object registry with errors that list the known names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def did_you_mean(word: Any, candidates: Iterable[str]) -> str | None:
    """The closest of ``candidates`` to ``word`` (a misspelling), or None (also for a non-string)."""
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def hint(word: Any, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for a close candidate, else ``""``."""
    guess = did_you_mean(word, candidates)
    return f"; did you mean {guess!r}?" if guess else ""


def unknown_name(kind: str, name: Any, known: Iterable[str]) -> str:
    """``unknown <kind> 'x'; did you mean 'y'? known: a, b`` (the hint only when one is close)."""
    known = list(known)
    guess = hint(name, known)
    return f"unknown {kind} {name!r}{guess}{' ' if guess else '; '}known: {', '.join(known) or '(none)'}"


class UnknownNameError(KeyError):
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
