"""Which pages the kernel was handed, and which a push is handing it now.

DESIGN.md invariant 3 lives here and nowhere else: a page is pushed into the
page cache (notify_store) only if it was never served, because the kernel may
hold a served page dirty and a push would overwrite the guest's writes.  A
READ marks its pages the moment it arrives (``mark``); the prefetcher claims
a range (``pushing``) and takes each page just before its push
(``take_for_push``): test and set under one lock, from the push thread, so a
page is served once, by a READ or by a push, never both unseen.

What remains is the microseconds between ``take_for_push`` and the kernel's
lookup inside notify_store; a READ landing there (on a page a push in flight
took) is reported by ``mark``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from .pagemap import runs


#: a served byte: 0 never served, 1 by a READ (or a resumed mount), 2 by a push
_READ, _PUSHED = 1, 2
_NONZERO = bytes([0]) + bytes([1]) * 255


class ServedPages:
    """Per region: a served byte per page, its count, and the pushes in flight."""

    def __init__(self) -> None:
        self._bits: dict[str, bytearray] = {}
        self._count: dict[str, int] = {}
        #: held while a page's mark is tested and set (the push thread, READs)
        self._lock = threading.Lock()
        #: region -> page ranges pushes are writing into the page cache now
        self._pushing: dict[str, list[tuple[int, int]]] = {}

    def add_region(self, name: str, npages: int) -> None:
        """Track ``name``: none of its pages served yet."""
        self._bits[name] = bytearray(npages)
        self._count[name] = 0
        self._pushing[name] = []

    def mark(self, name: str, first: int, end: int) -> tuple[int, int] | None:
        """Pages [first, end) are served from now on (each counted once).

        Returns a range a push is writing now if it overlaps (a push race:
        the caller counts and logs it), else None."""
        bits = self._bits[name]
        raced = None
        with self._lock:
            for lo, hi in self._pushing[name]:
                if lo < end and first < hi and _PUSHED in bits[max(lo, first):min(hi, end)]:
                    raced = (lo, hi)
            new = bits.count(0, first, end)
            if new:
                bits[first:end] = bytes([_READ]) * (end - first)
                self._count[name] += new
        return raced

    def is_served(self, name: str, page: int) -> bool:
        return bool(self._bits[name][page])

    @contextmanager
    def pushing(self, name: str, first: int, end: int) -> Iterator[None]:
        """Claim pages [first, end) of ``name`` for one push, released at
        exit (pushes of several batches may be in flight side by side)."""
        claims = self._pushing[name]
        claim = (first, end)
        claims.append(claim)
        try:
            yield
        finally:
            claims.remove(claim)

    def take_for_push(self, name: str, page: int) -> bool:
        """True if ``page`` was never served: it is served from now on, and the
        caller (inside ``pushing``) may push it.  Thread-safe."""
        claims = tuple(self._pushing[name])  # one copy: the loop changes the list
        if not any(lo <= page < hi for lo, hi in claims):
            raise RuntimeError(f"page {page} of {name} is outside every claimed push")
        bits = self._bits[name]
        with self._lock:
            if bits[page]:
                return False
            bits[page] = _PUSHED
            self._count[name] += 1
        return True

    def runs(self, name: str) -> Iterator[tuple[int, int]]:
        """[start, end) of each run of served pages of ``name``."""
        return runs(self._bits[name].translate(_NONZERO))

    def count(self, name: str | None = None) -> int:
        """Pages served, of ``name`` or of every region."""
        return self._count[name] if name is not None else sum(self._count.values())
