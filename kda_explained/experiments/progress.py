"""A dependency-free progress bar on stderr, for the long runs of the synthetic tasks.

On a terminal it redraws one line in place (at most ten times a second); into a
file or pipe (``nohup ... > log``) it writes a fresh line at most every
``log_interval`` seconds, so a log stays readable.

>>> import io
>>> out = io.StringIO()
>>> bar = Progress(4, "mqar kda", stream=out)
>>> for _ in range(4):
...     bar.update(loss=0.5)
>>> bar.close()
>>> out.getvalue().splitlines()[-1].startswith("mqar kda |##############################| 4/4 100%")
True
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``total`` steps; :meth:`update` advances and shows ``key=value`` pairs after the bar."""

    def __init__(self, total: int, desc: str = "", stream: Optional[TextIO] = None, width: int = 30,
                 log_interval: float = 15.0):
        self.total, self.desc, self.width = max(int(total), 1), desc, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else log_interval
        self.n, self.postfix, self.drawn = 0, "", -1
        self.start = self.last = time.perf_counter()
        self.closed = False

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by ``n`` steps; ``postfix`` (e.g. ``loss=0.31``) is shown after the bar."""
        self.n = min(self.n + n, self.total)
        if postfix:
            self.postfix = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        now = time.perf_counter()
        if now - self.last >= self.interval or self.n == self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.n / self.total
        done = int(round(frac * self.width))
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        self.drawn = self.n
        line = (f"{self.desc} |{'#' * done}{'-' * (self.width - done)}| {self.n}/{self.total} {frac:4.0%} "
                f"{_clock(elapsed)}<{_clock(eta)} {self.postfix}").rstrip()
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (unless it is already shown) and end the line."""
        if self.closed:
            return
        self.closed = True
        if self.drawn != self.n:
            self._draw(time.perf_counter())
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
