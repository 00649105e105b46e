"""Which pages of each region changed since a volume last received them.

Why: a guest whose RAM is a memfs region (``share=on``) has its changed pages
written back by the kernel as WRITEs.  Marking them here gives the daemon the
dirty set without ever reading RAM, so a migration's final pass costs what
the guest dirtied since the last sync, not the size of RAM.

Pure data: one byte per page (1 = dirty) and a running count, so that the
``pages_dirty`` gauge costs nothing however large the region.
"""

from __future__ import annotations

from typing import Iterator

from .pagemap import runs


class DirtySet:
    """Per region, a byte per page: 1 while the page is dirty."""

    def __init__(self, npages: dict[str, int]) -> None:
        self.bits: dict[str, bytearray] = {n: bytearray(c) for n, c in npages.items()}
        self.count = 0
        #: pages ever marked (a page marked twice counts twice)
        self.marked = 0

    def mark(self, name: str, first: int, last: int) -> None:
        """Pages ``first`` .. ``last - 1`` were written."""
        bits = self.bits[name]
        self.count += bits.count(0, first, last)
        self.marked += last - first
        bits[first:last] = b"\1" * (last - first)

    def clear(self, name: str, first: int, last: int) -> None:
        """Pages ``first`` .. ``last - 1`` are about to be copied to the volume:
        a WRITE that lands after this marks them again."""
        bits = self.bits[name]
        self.count -= bits.count(1, first, last)
        bits[first:last] = bytes(last - first)

    def is_dirty(self, name: str, page: int) -> bool:
        return bool(self.bits[name][page])

    def runs(self, name: str, max_pages: int) -> Iterator[tuple[int, int]]:
        """(first, last) of each run of dirty pages, cut at ``max_pages``."""
        for at, end in runs(self.bits[name]):
            for a in range(at, end, max_pages):
                yield a, min(end, a + max_pages)

    def snapshot(self, name: str) -> bytes:
        return bytes(self.bits[name])
