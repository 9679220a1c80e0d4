"""The checks a family's ``validate`` is made of: each raises a :class:`SpecError` that names the
spec field and why it is refused."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..registry import hint
from .base import Spec, SpecError


def require(cond: bool, field_name: str, why: str) -> None:
    """Validation helper: raise a SpecError naming ``field_name`` unless ``cond``."""
    if not cond:
        raise SpecError(f"spec field {field_name!r}: {why}")


def require_choice(value: Any, choices: Iterable[str], field_name: str) -> None:
    """``value`` is one of ``choices`` (a string: a list or number is refused, not looked up)."""
    choices = list(choices)
    if isinstance(value, str) and value in choices:
        return
    require(
        False, field_name, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint(value, choices)}"
    )


def require_int(value: Any, field_name: str, minimum: int = 1) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, field_name, f"must be an integer >= {minimum}, got {value!r}")


def validate_input_size(spec: Spec) -> None:
    """The optional ``input_size`` hint shared by the ImageNet-style families."""
    if "input_size" in spec:
        require_int(spec["input_size"], "input_size")


def check_fields(obj: dict[str, Any], known: set[str], required: tuple[str, ...], where: str = "") -> None:
    """Reject unknown fields and require the mandatory ones, naming the field (``where`` prefixes
    the names of a nested object's fields, e.g. "stages[1].")."""
    extra = sorted(set(obj) - known)
    require(not extra, where + (extra[0] if extra else ""), f"unknown field; known: {', '.join(sorted(known))}")
    for key in required:
        require(key in obj, where + key, "is required")
