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


_NONZERO = bytes([0]) + bytes([1]) * 255


class ServedPages:
    """Per region: a served byte per page and its count."""

    def __init__(self) -> None:
        self._bits: dict[str, bytearray] = {}
        self._count: dict[str, int] = {}

    def add_region(self, name: str, npages: int) -> None:
        """Track ``name``: none of its pages served yet."""
        self._bits[name] = bytearray(npages)
        self._count[name] = 0

    def mark(self, name: str, first: int, end: int) -> None:
        """Pages [first, end) are served from now on (each counted once)."""
        bits = self._bits[name]
        new = bits.count(0, first, end)
        if new:
            bits[first:end] = b"\x01" * (end - first)
            self._count[name] += new

    def runs(self, name: str) -> Iterator[tuple[int, int]]:
        """[start, end) of each run of served pages of ``name``."""
        return runs(self._bits[name].translate(_NONZERO))

    def count(self, name: str | None = None) -> int:
        """Pages served, of ``name`` or of every region."""
        return self._count[name] if name is not None else sum(self._count.values())
