"""Progress for long work on stderr: a tqdm bar on a terminal; in a log file (stderr not a
terminal: batch jobs, ``2> log``) one plain line every ``LOG_EVERY`` seconds instead of a bar
redrawn with carriage returns. Silent when disabled or with BITSEARCH_NO_PROGRESS set."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

__all__ = ["progress", "LineProgress", "LOG_EVERY"]

#: seconds between two progress lines in a log file
LOG_EVERY = 30.0


def progress(it: Iterable[T], desc: str = "", total: int | None = None, enable: bool = True) -> Iterable[T]:
    if not enable or os.environ.get("BITSEARCH_NO_PROGRESS"):
        return it
    stream = sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return LineProgress(it, desc=desc, total=total, stream=stream)
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LineProgress:
    """Iterates ``it`` and writes ``desc: n/total (pct), elapsed, ~left, postfix`` to ``stream``
    at most every ``every`` seconds, and a last line when the work took that long at all."""

    def __init__(
        self,
        it: Iterable[T],
        desc: str = "",
        total: int | None = None,
        stream: TextIO | None = None,
        every: float = LOG_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.it, self.desc, self.stream, self.every, self.clock = it, desc, stream or sys.stderr, every, clock
        self.total = total if total is not None else (len(it) if hasattr(it, "__len__") else None)
        self.postfix = ""

    def __len__(self) -> int:
        return len(self.it)

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())

    def set_postfix_str(self, s: str, refresh: bool = False) -> None:
        self.postfix = s

    def _line(self, n: int, elapsed: float) -> str:
        done = f"{n}/{self.total} ({100 * n / self.total:.0f} %)" if self.total else f"{n}"
        left = f", ~{_duration(elapsed * (self.total - n) / n)} left" if self.total and 0 < n < self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}, {_duration(elapsed)} elapsed{left}{tail}\n"

    def __iter__(self) -> Iterator[T]:
        t0 = last = self.clock()
        n = reported = 0
        for x in self.it:
            yield x
            n += 1
            now = self.clock()
            if now - last >= self.every:
                last, reported = now, n
                self.stream.write(self._line(n, now - t0))
                self.stream.flush()
        if 0 < reported < n:  # long enough to have reported: say it finished
            self.stream.write(self._line(n, self.clock() - t0))
            self.stream.flush()
