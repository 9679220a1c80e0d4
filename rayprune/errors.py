"""The root of rayprune's errors, and their wording for users.

:class:`RaypruneError` is the base of every error meant for the user: bad input, missing data, a
refused file. Its message is one line naming the problem and the fix in the library's terms
(settings, files), never a command-line flag; its ``fix``, ``option`` and ``hint`` let the
command line word it with its flags (:mod:`rayprune.cli`). Anything else that escapes a command
is a bug.

A :class:`pydantic.ValidationError` names internal classes (``TrialConfig``, ``RankedHparams``,
``Budget``), prefixes "Value error,", and says "Field required" where the user misspelt a key.
:func:`describe` turns its most useful error into ``(field path, message)``: the path as the
user wrote it (``grid.flops_targets[1]``, or, through ``name``, a command-line flag), the
allowed keys or values, and "did you mean ..." for a misspelt key or value (:mod:`difflib`).
:func:`explain` is the whole line; :func:`validated` raises it as an :class:`InputError`.

Pure Python + pydantic: the algorithm core may import it.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

__all__ = [
    "InputError",
    "RaypruneError",
    "allowed_keys",
    "describe",
    "did_you_mean",
    "explain",
    "field_path",
    "hint",
    "unknown_name",
    "validated",
]

ModelT = TypeVar("ModelT", bound=BaseModel)


class RaypruneError(Exception):
    """The base of every error meant for the user: one line naming the problem and the fix, in
    the library's terms (settings, files), never a command-line flag.

    Args:
        message: the problem (and the fix, unless ``fix`` is given).
        fix: what to do about it, in the library's terms; the line is ``message; fix``.
        option: the setting at fault, by its keyword (``"out_dir"``), when the line starts with
            that name; the command line names its flag there instead.
        hint: the key of the command line's wording of ``fix``, which names its flags
            (``rayprune.cli.HINTS``); other callers see ``fix``.
    """

    def __init__(self, message: str = "", *, fix: str = "", option: str | None = None, hint: str | None = None) -> None:
        super().__init__(f"{message}; {fix}" if fix else message)
        self.problem = message
        self.fix = fix
        self.option = option
        self.hint = hint


class InputError(RaypruneError, ValueError):
    """A value the user gave cannot work: a setting, a hyperparameter, a recipe, a device. When
    pydantic refused it, ``__cause__`` is its ValidationError (the command line names its flags).

    A ValueError too: the engine's callers and tests catch invalid values as ValueError.
    """


def validated(model: type[ModelT], data: Any) -> ModelT:
    """``model.model_validate(data)``; pydantic's error becomes an :class:`InputError` with
    :func:`explain`'s line (and the ValidationError as its cause)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InputError(explain(e, model)) from e


# ---------------------------------------------------------------------------------------------
# Names: "did you mean ...", "unknown ... known: ..."
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# pydantic's errors as one line
# ---------------------------------------------------------------------------------------------

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
    field = name(loc) if name is not None else field_path(loc, prefix)
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


def field_path(loc: tuple, prefix: str = "") -> str:
    """``loc`` (field names and list indices) as the user writes it: ``grid.flops_targets[1]``."""
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
