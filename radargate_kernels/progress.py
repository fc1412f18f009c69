"""A progress line for the benchmark, example and experiment scripts.

On a terminal: one line redrawn in place (``\\r``). Redirected to a file or a CI log: a plain line
at each quarter of the work and at the end, so the log stays readable.
"""
from __future__ import annotations

import sys
import time


class Progress:
    """``p = Progress(total, label); p.update(i, note)`` for i = 1..total."""

    def __init__(self, total: int, label: str = "", stream=None, width: int = 24):
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = stream if stream is not None else sys.stdout
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()
        self.next_mark = 0.25

    def update(self, done: int, note: str = ""):
        frac = done / self.total
        if not self.live and frac < self.next_mark and done < self.total:
            return
        while self.next_mark <= frac:
            self.next_mark += 0.25
        n = int(self.width * frac)
        line = (f"{self.label} [{'#' * n}{'.' * (self.width - n)}] {done}/{self.total} "
                f"{time.time() - self.t0:6.1f} s {note}")
        if self.live:
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line.rstrip() + "\n")
        self.stream.flush()
