"""Which pages the kernel was handed.

A page handed to the kernel (a READ answered, or a mount resumed with it
served) may sit in the page cache, dirty with the guest's writes that this
daemon has not seen yet.  The state journal (memfs.state) records these
pages so that a restarted daemon knows it; ``PageServer.view`` keeps them
out of REMOTE and ZERO for the same reason.

DESIGN.md invariant 3 (never push a served page) needs nothing here any
more: the prefetcher pushes by having the kernel read a range in
(memfs.prefetch.read_through), and the kernel reads only the pages it does
not hold, so no push can land on a served page.
"""

from __future__ import annotations

from typing import Iterator

from .pagemap import runs


#: _BIT[k][b]: bit k of byte b, as a byte (0 or 1)
_BIT = [bytes((b >> k) & 1 for b in range(256)) for k in range(8)]


class ServedPages:
    """Per region: a served bit per page and its count.  A bit, not a byte:
    2 MiB for a 64 GiB region instead of 16 (issue 11: the daemon's RSS)."""

    def __init__(self) -> None:
        self._bits: dict[str, bytearray] = {}
        self._npages: dict[str, int] = {}
        self._count: dict[str, int] = {}

    def add_region(self, name: str, npages: int) -> None:
        """Track ``name``: none of its pages served yet."""
        self._bits[name] = bytearray((npages + 7) >> 3)
        self._npages[name] = npages
        self._count[name] = 0

    def mark(self, name: str, first: int, end: int) -> None:
        """Pages [first, end) are served from now on (each counted once)."""
        end = min(end, self._npages[name])
        if end <= first:
            return
        bits = self._bits[name]
        if end - first == 1:  # a 4 KiB READ, the common case
            at, bit = first >> 3, 1 << (first & 7)
            if not bits[at] & bit:
                bits[at] |= bit
                self._count[name] += 1
            return
        lo, hi = first >> 3, (end + 7) >> 3
        old = int.from_bytes(bits[lo:hi], "little")
        mask = ((1 << (end - first)) - 1) << (first & 7)
        new = (mask & ~old).bit_count()
        if new:
            bits[lo:hi] = (old | mask).to_bytes(hi - lo, "little")
            self._count[name] += new

    def pages(self, name: str) -> bytearray:
        """A byte per page of ``name``: 1 if served (built in C: eight
        translations and strided copies, not a loop over the pages)."""
        bits = self._bits[name]
        out = bytearray(8 * len(bits))
        for k in range(8):
            out[k::8] = bits.translate(_BIT[k])
        del out[self._npages[name]:]
        return out

    def runs(self, name: str) -> Iterator[tuple[int, int]]:
        """[start, end) of each run of served pages of ``name``."""
        return runs(self.pages(name))

    def count(self, name: str | None = None) -> int:
        """Pages served, of ``name`` or of every region."""
        return self._count[name] if name is not None else sum(self._count.values())
