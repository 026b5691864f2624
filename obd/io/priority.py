"""How urgent a read is: on-demand (a client waits on it) or prefetch (nobody waits on it yet).

The priority travels in a context variable, so the code that knows (trace replay, metadata
prefetch, ``obd pull``) marks its reads with :func:`background_reads` and the code that sends the
requests (:mod:`obd.registry.dragonfly`, as ``X-Dragonfly-Priority``) reads it with
:func:`read_priority`, with nothing in between passing it along. Context variables follow a read
into the registry's event loop (``run_coroutine_threadsafe`` copies the caller's context), but not
into other threads: mark the function a pool runs, e.g. ``@background_reads()``. This module is
imported by the prefetch code, so it stays free of the registry client (aiohttp is slow to import).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Dragonfly's ``Priority`` levels as nydus sends them: LEVEL6 for reads a client waits on…
PRIORITY_ON_DEMAND = 6
#: …LEVEL3 for reads nobody waits on yet (prefetch, readahead).
PRIORITY_PREFETCH = 3

_PRIORITY: contextvars.ContextVar[int | None] = contextvars.ContextVar("obd_read_priority", default=None)


def read_priority() -> int:
    """The priority of reads made now (on-demand unless inside :func:`background_reads`)."""
    value = _PRIORITY.get()
    return PRIORITY_ON_DEMAND if value is None else value


class reads_at:
    """Reads made inside ``with reads_at(priority):`` (in this thread or task) carry ``priority``;
    as a decorator, every call of the function does (each call in its own thread's context)."""

    def __init__(self, priority: int):
        self.priority = priority
        self._token: contextvars.Token[int | None] | None = None

    def __enter__(self) -> None:
        self._token = _PRIORITY.set(self.priority)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _PRIORITY.reset(self._token)
            self._token = None

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        priority = self.priority

        @functools.wraps(fn)
        def marked(*args: P.args, **kwargs: P.kwargs) -> T:
            with reads_at(priority):
                return fn(*args, **kwargs)

        return marked


def background_reads() -> reads_at:
    """Mark the reads of the block as prefetch (also a decorator: ``@background_reads()``)."""
    return reads_at(PRIORITY_PREFETCH)


__all__ = ["PRIORITY_ON_DEMAND", "PRIORITY_PREFETCH", "background_reads", "read_priority", "reads_at"]
