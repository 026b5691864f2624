"""One asyncio event loop in a daemon thread, for the synchronous engine to submit remote I/O to.

The engine's API is synchronous and thread-safe (DESIGN.md, Concurrency): a ``pread`` on a remote
layer calls :meth:`AsyncRunner.run` with a coroutine, which is scheduled on the runner's loop while
the calling thread waits on a future with the GIL free. Many frontend threads can wait at once, and
all their HTTP requests share one aiohttp session and connection pool on that loop.

The loop thread starts on first use. nbdkit forks after loading the plugin, and a forked child has
the parent's runner object but not its thread; the runner notices the changed pid and starts a
fresh loop in the child (objects bound to the old loop, like aiohttp sessions, must do the same:
:attr:`AsyncRunner.generation` changes whenever the loop is replaced).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

from obd.errors import RegistryError

T = TypeVar("T")

_RUNNERS: weakref.WeakSet[AsyncRunner] = weakref.WeakSet()


class AsyncRunner:
    """Runs coroutines on a private event loop thread; safe to call from any other thread."""

    def __init__(self, name: str = "obd-io"):
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        #: Incremented every time a new loop is started (first use, after fork, after close).
        self.generation = 0
        _RUNNERS.add(self)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started (or restarted after ``fork()``) if needed."""
        return self._ensure()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and self._pid == os.getpid() and not loop.is_closed():
            return loop
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: the parent's loop thread does not exist here. Forget it without
                # touching it (closing it could act on file descriptors the parent still uses).
                self._loop = None
                self._thread = None
                self._pid = os.getpid()
            if self._loop is None or self._loop.is_closed():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                try:
                    _cancel_all(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        thread = threading.Thread(target=main, name=self.name, daemon=True)
        thread.start()
        ready.wait()
        self._loop = loop
        self._thread = thread
        self.generation += 1

    def in_loop_thread(self) -> bool:
        """True when called from the runner's own loop thread (where :meth:`run` would deadlock)."""
        return self._thread is not None and threading.current_thread() is self._thread

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is still running, stop the loop and join its thread. A later use restarts it."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._pid != os.getpid():
                self._loop = self._thread = None
                return
            self._loop = self._thread = None
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is not thread:
            thread.join(timeout)

    # -- running coroutines --------------------------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; return a thread-safe future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._ensure())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result from this (non-loop) thread.

        With a ``timeout`` (seconds) the coroutine is cancelled when it runs over and
        :class:`~obd.errors.RegistryError` is raised. Exceptions of the coroutine propagate as they are.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("AsyncRunner.run() called from its own loop thread; await the coroutine")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RegistryError(f"remote operation did not finish within {timeout:g} s") from None
        except BaseException:
            # KeyboardInterrupt in the waiting thread: do not leave the coroutine running unattended.
            if not future.done():
                future.cancel()
            raise


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def _after_fork_in_child() -> None:
    # The lock may have been held by another parent thread at fork time; that thread does not exist
    # in the child, so the lock would never be released.
    global _DEFAULT_LOCK
    _DEFAULT_LOCK = threading.Lock()
    for runner in list(_RUNNERS):
        runner._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_DEFAULT: AsyncRunner | None = None
_DEFAULT_LOCK = threading.Lock()


def default_runner() -> AsyncRunner:
    """The process-wide runner remote layers share unless given their own."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = AsyncRunner()
        return _DEFAULT


__all__ = ["AsyncRunner", "default_runner"]
