"""A one-line progress bar for long passes over RAM or a disk (capture,
index); silent unless stderr is a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.t0 = time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def update(self, n: int, label: str) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and self.done < self.total):
            return
        self._last = now
        frac = self.done / self.total
        rate = self.done / max(now - self.t0, 1e-6) / (1 << 20)
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r{label:<10} [{bar:<30}] {frac:6.1%} {rate:8.1f} MiB/s")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
