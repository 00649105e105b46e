"""Pages a prefetch batch kept, held in memory while its push runs.

A push is a read of the region file through the kernel (memfs.prefetch):
the kernel asks this daemon, with READs, for the batch's pages it lacks.
Those pages are LOCAL by then; answering them from the bytes just fetched
spares reading the store back (which ``trim`` may already have dropped
from the page cache).  DESIGN.md invariant 2 holds because a page enters
only under the region lock as it turns LOCAL (``hold``), and a WRITE drops
its pages under that lock before it stores anything (``drop``): from then
on a READ finds them in the store, with the written bytes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .pagemap import PageState

LOCAL = PageState.LOCAL


class HeldPages:
    """region -> page -> the bytes a prefetch batch kept, until its push ends."""

    def __init__(self, regions: Iterable[str]) -> None:
        self._held: dict[str, dict[int, memoryview]] = {n: {} for n in regions}

    def hold(self, name: str, pages: Sequence[int], got: dict[int, memoryview]) -> None:
        """Under the region lock, as ``pages`` turn LOCAL."""
        held = self._held[name]
        for p in pages:
            held[p] = got[p]

    def release(self, name: str, pages: Sequence[int]) -> None:
        held = self._held[name]
        for p in pages:
            held.pop(p, None)

    def drop(self, name: str, first: int, end: int) -> None:
        """A WRITE of [first, end), under the region lock, before it stores."""
        held = self._held[name]
        if held:
            for p in range(first, end):
                held.pop(p, None)

    def held(self, name: str) -> dict[int, memoryview]:
        """The held pages of ``name`` (tests)."""
        return dict(self._held[name])

    def split(self, name: str, states: bytearray, first: int, count: int,
              skip: set[int]) -> tuple[dict[int, memoryview], list[int]]:
        """The LOCAL pages of [first, first+count) not in ``skip``: (those
        held, with their bytes; the others, for the store).  Copy the held
        ones before the next await, or a WRITE may slip in between."""
        held = self._held[name]
        hits: dict[int, memoryview] = {}
        rest: list[int] = []
        for p in range(first, first + count):
            if states[p] != LOCAL or p in skip:
                continue
            data = held.get(p)
            if data is not None:
                hits[p] = data
            else:
                rest.append(p)
        return hits, rest
