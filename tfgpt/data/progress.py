"""A progress line for long data work: bytes done of a total, MB/s and ETA.

On a terminal the line is rewritten in place (about twice a second) on
stderr; otherwise a plain line goes to this module's logger (INFO) every
`every` seconds, so that logs of long runs show progress without a line per
update. The line is live only when that logger lets INFO messages through:
a process whose "tfgpt" logger is quiet (a worker other than the chief)
draws nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from tfgpt.console import duration

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, label: str, total: int, live: bool | None = None, every: float = 30.0):
        self.label, self.total, self.every = label, max(1, int(total)), every
        self.live = sys.stderr.isatty() and log.isEnabledFor(logging.INFO) if live is None else live
        self.done, self.start = 0, time.monotonic()
        self._shown, self._lock = self.start, threading.Lock()
        self._drawn = False

    def add(self, n: int) -> None:
        """n more bytes done (thread-safe: readers may run in tf.data threads)."""
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._shown >= (0.5 if self.live else self.every):
                self._shown = now
                self._show(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = min(100.0, 100.0 * self.done / self.total)
        return (
            f"{self.label}: {self.done / 1e6:,.0f} of {self.total / 1e6:,.0f} MB ({pct:.0f}%), "
            f"{rate / 1e6:.1f} MB/s, ETA {duration(left)}"
        )

    def _show(self, now: float) -> None:
        if self.live:
            print(f"\r  {self.line(now)}\x1b[K", end="", file=sys.stderr, flush=True)
            self._drawn = True
        else:
            log.info(self.line(now))

    def close(self) -> None:
        """Ends the live line (the caller prints the summary)."""
        if self._drawn:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
            self._drawn = False
