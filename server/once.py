"""Process-wide resources made once, even when their first callers arrive together.

``functools.lru_cache`` is thread-safe for its table but not for the call it caches: threads that miss at the
same moment each call the function, and all but one result are dropped. For an engine that is a connection pool
made, used for one request and dropped holding its connection until a garbage collection closes it (measured:
eight threads asking for the read engine at once in a fresh process made eight engines; the dashboard's first
results page fires its reads together, and the dropped pools' connections showed up as ``ResourceWarning`` in
whatever test ran next). :func:`made_once` makes the first callers wait for one creation instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from functools import lru_cache, update_wrapper
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["MadeOnce", "made_once"]


class MadeOnce(Generic[T]):
    """``make`` cached per (positional, hashable) arguments; made once per distinct arguments, whatever the threads."""

    def __init__(self, make: Callable[..., T]) -> None:
        self._cached = lru_cache(maxsize=None)(make)
        # Held for the lookup too: a hit costs an uncontended acquire (well under a microsecond), and a miss
        # makes the resource with every other caller waiting for it.
        self._lock = threading.Lock()
        # A child forked while another thread held the lock would wait on it forever (Celery's prefork pool forks
        # its parent, whose threads may be making a resource): each child starts with a free lock.
        os.register_at_fork(after_in_child=self._free_lock)
        update_wrapper(self, make)

    def _free_lock(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, *args: Hashable) -> T:
        with self._lock:
            return self._cached(*args)

    def cache_clear(self) -> None:
        """Forget what was made (the caller disposes of it first where it holds connections)."""
        with self._lock:
            self._cached.cache_clear()


def made_once(make: Callable[..., T]) -> MadeOnce[T]:
    """Decorator: ``make``'s result cached per (positional, hashable) arguments, made once even when first called
    from several threads at once."""
    return MadeOnce(make)
