"""A file mapped the way a guest maps its RAM, and timed first touches of it."""

from __future__ import annotations

import mmap
import os
import time


def mapping(path: str, size: int, *, write: bool = False, advice: int | None = None) -> mmap.mmap:
    """``path`` mapped shared (read-only unless ``write``), with madvise ``advice``."""
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    if advice is not None:
        m.madvise(advice)
    return m


def touch_timed(m: mmap.mmap, offsets: list[int]) -> list[float]:
    """Seconds each read of one byte at ``offsets`` took (a fault, when cold)."""
    pc = time.perf_counter
    lat = []
    for off in offsets:
        t = pc()
        m[off]
        lat.append(pc() - t)
    return lat
