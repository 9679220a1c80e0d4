"""The label of the training phase in progress, shown on its progress bar.

Training (:func:`rayprune.engine.train.fit`) draws one bar per call; what that call is for (the
teacher, search step 3 of 14, the final fine-tune) is known only by its callers, further up.
They name the phase with :func:`phase`; the bar reads it with :func:`label`. A context variable,
so concurrent trials in one process (threads, Ray's local mode) keep their own labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_LABEL: ContextVar[str] = ContextVar("rayprune_progress_label", default="fit")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Label every training bar drawn inside the ``with`` block ``name``."""
    token = _LABEL.set(name)
    try:
        yield
    finally:
        _LABEL.reset(token)


def label() -> str:
    """The current phase's label (``"fit"`` outside any :func:`phase`)."""
    return _LABEL.get()
