"""Progress lines with rate and ETA for the long loops outside training (generation, judging, scoring, caches, KL).

``desc: i/N unit (rate unit/s, ETA mm:ss)``. In a log (stderr not a terminal) a line is printed at most every
``every_s`` seconds or ``every_n`` items, plus one final ``desc: N/N unit (rate unit/s, done in mm:ss)`` line; on a
terminal the line is rewritten in place. A loop done within ``quiet_s`` seconds (2 by default) prints nothing, so
the many small loops of a quick run do not fill the console. Only the global-rank-0 process prints. Training has
:class:`sacpo_lightning.callbacks.ProgressLog`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar

__all__ = ["Progress", "format_clock", "progress"]

T = TypeVar("T")

DEFAULT_EVERY_S = 10.0
DEFAULT_QUIET_S = 2.0
TTY_EVERY_S = 0.5


def format_clock(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour on."""
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _format_rate(rate: float) -> str:
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


def _is_rank_zero() -> bool:
    # the launchers' variables: Lightning's own rank bookkeeping lives in the layer above
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(name, "0") not in ("", "0"):
            return False
    return True


class Progress:
    """Counts finished items of a loop of known length and prints throttled progress lines.

    Args:
        total: Number of items the loop will finish.
        desc: What is being done, e.g. ``"generate policy"``; the start of every line.
        unit: The items' name in the line (``"responses"``); empty for none.
        every_s: Seconds between lines in a log (a terminal is refreshed every half second).
        every_n: Also print after every ``every_n`` items (``None``: by time only).
        quiet_s: A loop that ends within this many seconds, before any line was due, prints nothing
            (default :data:`DEFAULT_QUIET_S`).
        stream: Where lines go (default: ``sys.stderr`` at the time of printing).
        interactive: Rewrite one line in place (default: whether ``stream`` is a terminal).
        clock: Monotonic seconds (a fake one in tests).
        enabled: ``False`` prints nothing (default: only on global rank 0).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "",
        every_s: float = DEFAULT_EVERY_S,
        every_n: int | None = None,
        quiet_s: float | None = None,
        stream: IO[str] | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool | None = None,
    ) -> None:
        if total < 0:
            raise ValueError(f"Progress total must be >= 0, got {total}")
        if every_s <= 0 or (every_n is not None and every_n < 1):
            raise ValueError(f"Progress every_s must be > 0 and every_n >= 1, got {every_s} and {every_n}")
        self.total = int(total)
        self.desc = desc
        self.unit = f" {unit}" if unit else ""
        self.every_s = every_s
        self.every_n = every_n
        self.quiet_s = DEFAULT_QUIET_S if quiet_s is None else quiet_s
        self._stream = stream
        self._interactive = interactive
        self._clock = clock
        self.enabled = _is_rank_zero() if enabled is None else enabled
        self.count = 0
        self._start = clock()
        self._last_time = self._start
        self._last_count = 0
        self._closed = False
        self._printed = False
        self._width = 0

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def line(self, now: float | None = None) -> str:
        """The progress line for the items counted so far."""
        now = self._clock() if now is None else now
        elapsed = now - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: {self.count}/{self.total}{self.unit} ({_format_rate(rate)}{self.unit}/s, "
        if self.count >= self.total:
            return head + f"done in {format_clock(elapsed)})"
        eta = format_clock((self.total - self.count) / rate) if rate > 0 else "?"
        return head + f"ETA {eta})"

    def update(self, n: int = 1) -> None:
        """Counts ``n`` more finished items; prints a line when one is due."""
        self.count += n
        if not self.enabled or self._closed:
            return
        if self.count >= self.total:
            self.close()
            return
        now = self._clock()
        every_s = TTY_EVERY_S if self.interactive else self.every_s
        due = now - self._last_time >= every_s
        if self.every_n is not None and self.count - self._last_count >= self.every_n:
            due = True
        if due:
            self._print(self.line(now), final=False)
            self._last_time, self._last_count = now, self.count

    def close(self) -> None:
        """Prints the final line (once), also when the loop stopped early."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled or not (self.total or self.count):  # an empty loop (all cached) says nothing
            return
        now = self._clock()
        if self._printed or now - self._start >= self.quiet_s:
            self._print(self.line(now), final=True)

    def _print(self, text: str, *, final: bool) -> None:
        stream = self.stream
        if self.interactive:
            stream.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
            self._width = len(text)
        else:
            stream.write(text + "\n")
        stream.flush()
        self._printed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.enabled and self.interactive and self._width:
            self.stream.write("\n")  # an error message starts on a line of its own


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", **kwargs) -> Iterator[T]:
    """Yields the items of ``iterable``, counting each as one finished item of a :class:`Progress`.

    ``total`` defaults to ``len(iterable)``; the other keyword arguments are :class:`Progress`'s.
    """
    if total is None:
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()
