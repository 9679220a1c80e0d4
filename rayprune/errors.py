"""pydantic validation errors as one line a user can act on.

A :class:`pydantic.ValidationError` names internal classes (``TrialConfig``, ``RankedHparams``,
``Budget``), prefixes "Value error,", and says "Field required" where the user misspelt a key.
:func:`describe` turns its most useful error into ``(field path, message)``: the path as the
user wrote it (``grid.flops_targets[1]``, or a command-line flag such as ``--kd-weight`` or
``--set epochs``), the allowed keys or values, and "did you mean ..." for a misspelt key or
value (:mod:`difflib`). :func:`explain` is the whole line, for the command line's error boundary.

Pure Python + pydantic: the algorithm core may import it.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .registry import did_you_mean, hint

__all__ = ["allowed_keys", "describe", "explain", "for_command_line"]

#: Union-member and validator tags pydantic puts into an error's location (not field names).
_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|tuple|set|literal|function-\w+|[\w-]*\[.*\])$")
#: Messages whose text already says what was given.
_SAYS_GOT = ("value_error", "assertion_error", "missing", "extra_forbidden")


def allowed_keys(root: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names of the model found by walking ``loc`` (field names and list indices) from ``root``."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and _TAG.match(part)):
            continue
        field = model.model_fields.get(part) if _is_model(model) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields) if _is_model(model) else []


def describe(
    error: ValidationError,
    root: type[BaseModel] | None = None,
    prefix: str = "",
    *,
    name: Callable[[tuple], str] | None = None,
) -> tuple[str, str]:
    """The most useful error of ``error`` as ``(field, message)``.

    Args:
        root: the model that was validated (lists the allowed keys of unknown-key errors).
        prefix: prepended to the field path (``"methods[0].hparams"``).
        name: renders a location (a tuple of field names and indices) instead of the dotted
            path, e.g. as a command-line flag; ``prefix`` is then ignored.
    """
    errors = error.errors(include_url=False)
    err, same = _pick(errors, root)
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _TAG.match(p)))
    kind, given = err["type"], err.get("input")
    message = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
    if kind == "extra_forbidden":
        allowed = allowed_keys(root, loc[:-1])
        guess = hint(loc[-1] if loc else None, allowed)
        message = "unknown field" + guess
        if allowed:
            message += f"{' ' if guess else '; '}allowed: {', '.join(allowed)}"
    elif kind == "missing":
        message = "required field is missing"
    elif kind in ("model_type", "model_attributes_type", "dict_type", "dataclass_type"):
        message = "must be a mapping (key: value)"
    elif kind == "literal_error":
        choices = re.findall(r"'([^']*)'", message)
        message += f", got {_short(given)}{hint(given, choices)}"
    elif kind not in _SAYS_GOT and "got " not in message and "input" in err:
        message += f", got {_short(given)}"
    message = re.sub(r"(valid dictionary or )?instance of [A-Z]\w*", "a mapping", message)
    more = len(errors) - 1 - same
    if more > 0:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    field = name(loc) if name is not None else _path(loc, prefix)
    return field, message


def explain(
    error: ValidationError,
    root: type[BaseModel] | None = None,
    prefix: str = "",
    *,
    name: Callable[[tuple], str] | None = None,
) -> str:
    """:func:`describe` as one ``field: message`` line (the message alone when there is no field)."""
    field, message = describe(error, root, prefix, name=name)
    return f"{field}: {message}" if field else message


# ---------------------------------------------------------------------------------------------


def _pick(errors: list[ErrorDetails], root: type[BaseModel] | None) -> tuple[ErrorDetails, int]:
    """A misspelt key (an unknown key close to a missing one) first, else the first error; and
    how many other errors are the same problem (the missing key the misspelling stands for)."""
    missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing"}
    for e in errors:
        if e["type"] == "extra_forbidden" and e["loc"]:
            parent = tuple(e["loc"][:-1])
            siblings = [m[-1] for m in missing if m and m[:-1] == parent and isinstance(m[-1], str)]
            if did_you_mean(e["loc"][-1], siblings):
                return e, 1
    return errors[0], 0


def _path(loc: tuple, prefix: str = "") -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside ``X``, ``X | None`` or ``list[X]``."""
    if _is_model(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def for_command_line(error: ValidationError) -> str:
    """:func:`explain` for the models the ``run``/``teacher`` options fill, naming the flags
    (``--kd-weight``, ``--set KEY``, ``--finetune KEY``) instead of the internal models."""
    from .engine.train import TrainConfig
    from .methods import MODULES, Budget, get_method
    from .runner import TrialConfig

    if error.title in (TrialConfig.__name__, Budget.__name__):
        root = TrialConfig if error.title == TrialConfig.__name__ else Budget
        return explain(error, root, name=_flag)
    if error.title == TrainConfig.__name__:
        return explain(error, TrainConfig, name=lambda loc: "--finetune " + _path(loc) if loc else "--finetune")
    if error.title.endswith("Hparams"):
        for method in MODULES:
            try:
                hparams = get_method(method).Hparams
            except Exception:
                continue
            if hparams.__name__ == error.title:
                return explain(error, hparams, name=lambda loc: "--set " + _path(loc) if loc else "--set")
    return explain(error)


def _flag(loc: tuple) -> str:
    """A TrialConfig/Budget location as the ``rayprune run`` flag that sets it."""
    if not loc:
        return ""
    head, rest = loc[0], loc[1:]
    if head == "hparams":
        return "--set " + _path(rest) if rest else "--set"
    if head == "finetune":
        return "--finetune " + _path(rest) if rest else "--finetune"
    return "--" + str(head).replace("_", "-")
