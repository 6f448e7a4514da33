"""What a run of tasks reports: :class:`Failure` for each failed task as it fails
(:func:`report`), and :class:`Progress` lines while it runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Lines of a task's log (or traceback) that a failure shows.
TAIL_LINES = 12


@dataclass(frozen=True)
class Failure:
    """A failed task: its name, output, submitit log (``None`` inline), what went wrong (the
    last line of the traceback, or the SLURM state) and the last lines of its log."""

    name: str
    output: str
    log: str | None
    error: str
    tail: str = ""
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        where = f"; see its submitit log {self.log}" if self.log else ""
        text = f"task {self.name!r} (output {self.output}) failed{where}: {self.error}"
        if self.tail:
            text += "\n" + "\n".join(f"    | {line}" for line in self.tail.splitlines())
        return text


def log_tail(path: Path | None, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of the file ``path`` (``""`` without one or when unreadable)."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def last_line(text: str) -> str:
    """The last non-blank line of ``text``, stripped."""
    rows = [r for r in str(text).strip().splitlines() if r.strip()]
    return rows[-1].strip() if rows else "(no message)"


def duration(s: float) -> str:
    """``s`` seconds as ``"42s"``, ``"3m10s"`` or ``"2h05m"``."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class Progress:
    """Plain progress lines: when something changed and ``every_s`` passed since the last
    line, at least every ``at_least_s``, and once at the end."""

    name: str
    total: int
    done: int
    enabled: bool = True
    every_s: float = 5.0
    at_least_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _start: float = field(init=False)
    _first: int = field(init=False)
    _last: float = field(init=False, default=float("-inf"))
    _shown: tuple = field(init=False, default=())

    def __post_init__(self) -> None:
        self._start, self._first = self.clock(), self.done

    def line(self, done: int, running: int) -> str:
        new, left = done - self._first, self.total - done
        if left == 0:
            eta = f"took {duration(self.clock() - self._start)}"
        elif new > 0:
            eta = "ETA " + duration((self.clock() - self._start) / new * left)
        else:
            eta = "ETA ?"
        return f"{self.name}: {done}/{self.total} done, {running} running, {eta}"

    def update(self, done: int, running: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now, state = self.clock(), (done, running)
        since = now - self._last
        if final or since >= self.at_least_s or (state != self._shown and since >= self.every_s):
            print(self.line(done, running), flush=True)
            self._last, self._shown = now, state


def report(failures: list[Failure], failure: Failure) -> None:
    """Add ``failure`` to ``failures`` and print it at once."""
    failures.append(failure)
    print("FAILED " + failure.describe(), flush=True)


def missing_output(task: Any, log: Path | None) -> Failure | None:
    """A failure when ``task`` returned without writing its output."""
    if Path(task.output).exists():
        return None
    error = "it returned without writing its output"
    return Failure(task.name, str(task.output), log and str(log), error, log_tail(log))
