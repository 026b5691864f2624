"""Progress reporting for long operations, on stderr.

On a terminal it redraws one line (bytes done, total, rate, ETA); otherwise it writes a plain line
at most every few seconds, so CI logs stay readable. Quiet mode prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """``with Progress("export", total) as p: p.update(done)``."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float | None = None,
    ):
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.start = time.monotonic()
        self._last = self.start

    def update(self, done: int, *, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if self.quiet or (not force and now - self._last < self.interval):
            return
        self._last = now
        self._emit(now, final=False)

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def _emit(self, now: float, *, final: bool) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {human_bytes(self.done)}"
        if self.total:
            pct = 100.0 * self.done / self.total
            text += f" / {human_bytes(self.total)} ({pct:.0f}%)"
            if not final and rate > 0 and self.done < self.total:
                text += f", ETA {(self.total - self.done) / rate:.0f} s"
        text += f", {human_bytes(rate)}/s"
        if final:
            text += f", {elapsed:.1f} s"
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if not self.quiet:
            self._emit(time.monotonic(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        elif self.tty and not self.quiet:
            self.stream.write("\n")


#: ``progress(label, total)`` → a :class:`Progress`; long operations take one so the caller decides
#: how progress shows (the CLI passes one that draws, library callers a quiet one).
ProgressFactory = Callable[[str, int | None], Progress]
