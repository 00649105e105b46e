"""Planning disk reads: which remote pages go into which request.

Pure functions of the page map: the fetcher asks them how to turn a set of
pages into few, large, contiguous disk reads, and how to name pages in a log
line.  Nothing here waits or reads a disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .pagemap import PageState, Region


@dataclass(frozen=True)
class Run:
    """One disk request: ``length`` bytes at ``offset`` holding ``pages``.

    ``pages`` are (page index, byte position in the request).  Small gaps
    between them are read and thrown away: one round trip is dearer than a
    few KiB of bandwidth (the identity layout leaves zero pages as gaps).
    """

    disk: int
    offset: int
    length: int
    pages: tuple[tuple[int, int], ...]

    @property
    def first(self) -> int:
        return self.pages[0][0]


def coalesce(region: Region, pages: Iterable[int], max_bytes: int,
             max_gap: int = 0) -> list[Run]:
    """Group remote ``pages`` (ascending) into disk requests of at most
    ``max_bytes``, bridging gaps of up to ``max_gap`` bytes on the disk."""
    ps = region.page_size
    disks, raw, sh = region.disks, region.offsets.raw, region.offsets.shift  # no per-page call
    runs: list[Run] = []
    cur: list[tuple[int, int]] = []
    disk = start = end = -1
    for p in pages:
        d, off = disks[p], raw[p] << sh
        if cur and d == disk and end <= off <= end + max_gap and off + ps - start <= max_bytes:
            cur.append((p, off - start))
            end = off + ps
            continue
        if cur:
            runs.append(Run(disk, start, end - start, tuple(cur)))
        disk, start, end = d, off, off + ps
        cur = [(p, 0)]
    if cur:
        runs.append(Run(disk, start, end - start, tuple(cur)))
    return runs


def remote_pages(region: Region, first: int, count: int) -> list[int]:
    """Indexes of the pages in [first, first+count) whose source bit is set."""
    states = region.states
    remote = PageState.REMOTE
    return [p for p in range(first, first + count) if states[p] == remote]


def stretches(pages: list[int]) -> list[tuple[int, int]]:
    """Ascending page indexes -> (first, count) of each consecutive stretch."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def ranges(pages: list[int]) -> str:
    """Compact "1-4,9" form for log lines."""
    out: list[str] = []
    start = prev = None
    for p in pages:
        if start is None:
            start = prev = p
        elif p == prev + 1:  # type: ignore[operator]
            prev = p
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = p
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out[:20]) + (",…" if len(out) > 20 else "")
