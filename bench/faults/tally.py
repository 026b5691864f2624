"""Counting trials: one outcome per trial, a per-trial watchdog, and the table the bench prints.

A trial is *correct* when it produced what the fault-free run produced; a *clear error* when it
stopped with an :class:`obd.errors.ObdError` (the error types a user sees as one line naming the
file and field); *wrong bytes* when it finished without an error but produced something else —
the one outcome a user can neither see nor recover from; a *hang* when the watchdog fired; a
*crash* for anything else (another exception type, a dead process, an unexpected exit code).
"""

from __future__ import annotations

import contextlib
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from obd.errors import ObdError

OUTCOMES = ("correct", "clear error", "wrong bytes", "hang", "crash")
COLUMNS = ("trials", *OUTCOMES)


class Watchdog(BaseException):
    """Raised inside a trial when its time is up (a BaseException, so no ``except Exception`` in the
    code under test can swallow it)."""


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`Watchdog` after ``seconds`` (main thread only, SIGALRM)."""

    def fire(signum: int, frame: Any) -> None:
        raise Watchdog(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Tally:
    """The counts of one table row, with a few examples of every bad outcome for the report."""

    row: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trials(self) -> int:
        return sum(self.counts.values())

    def add(self, outcome: str, detail: str = "") -> None:
        if outcome not in self.counts:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.counts[outcome] += 1
        if outcome in ("wrong bytes", "hang", "crash") and detail:
            seen = self.examples.setdefault(outcome, [])
            if len(seen) < 5:
                seen.append(detail)

    def merge(self, other: Tally) -> None:
        for k, v in other.counts.items():
            self.counts[k] += v
        for k, v in other.examples.items():
            self.examples.setdefault(k, []).extend(v[: 5 - len(self.examples.get(k, []))])
        self.notes.extend(other.notes)

    def trial(self, fn: Callable[[], Any], expect: Any, *, timeout: float, label: str) -> str:
        """Run ``fn`` under the watchdog and count its outcome: ``expect`` is what a correct run returns
        (``None``: any return counts as correct). Returns the outcome."""
        try:
            with watchdog(timeout):
                got = fn()
        except Watchdog:
            outcome, detail = "hang", label
        except ObdError:
            outcome, detail = "clear error", ""
        except Exception as e:  # every other exception type is what a crash is
            tb = traceback.extract_tb(e.__traceback__)[-1]
            where = f"{tb.filename.rsplit('/', 2)[-1]}:{tb.lineno}"
            outcome, detail = "crash", f"{label}: {type(e).__name__}: {str(e)[:160]} at {where}"
        else:
            if expect is None or got == expect:
                outcome, detail = "correct", ""
            else:
                outcome, detail = "wrong bytes", label
        self.add(outcome, detail)
        return outcome

    @property
    def ok(self) -> bool:
        return self.counts["wrong bytes"] == 0 and self.counts["hang"] == 0 and self.counts["crash"] == 0


def format_table(tallies: list[Tally]) -> str:
    """The table: one line per row, the columns of :data:`COLUMNS`, then time and examples."""
    width = max([len("row"), *(len(t.row) for t in tallies)])
    head = f"{'row':<{width}}  " + "  ".join(f"{c:>11}" for c in COLUMNS) + "  seconds"
    lines = [head, "-" * len(head)]
    for t in tallies:
        cells = [t.trials, *(t.counts[o] for o in OUTCOMES)]
        lines.append(f"{t.row:<{width}}  " + "  ".join(f"{c:>11}" for c in cells) + f"  {t.seconds:7.1f}")
    for t in tallies:
        for note in t.notes:
            lines.append(f"  {t.row}: {note}")
        for outcome, seen in t.examples.items():
            for e in seen:
                lines.append(f"  {t.row}: {outcome}: {e}")
    return "\n".join(lines)


class Clock:
    """Wall-time budget of a row: ``left()`` seconds until its deadline."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()
