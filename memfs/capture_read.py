"""Reading guest RAM for capture: large sequential preads in a thread, into
a few buffers in rotation, so that the disk and the classifier work at the
same time."""

from __future__ import annotations

import os

import trio

from .capture_types import CaptureError
from .fileio import pread_into

#: the unit of reading (and of the unchanged-chunk fast path)
CHUNK = 8 << 20
#: read buffers in rotation: one being filled, two in the channel, one being
#: classified, one spare
NBUF = 5


class BufferPool:
    """Read buffers kept between captures: a fresh 8 MiB buffer costs a page
    fault per page.  Its owner is whoever runs captures one after another
    (memfs.qemu.passes.ReadPasses keeps one for all the passes of a
    migration); a capture without one uses a pool of its own."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []

    def take(self) -> list[bytearray]:
        """NBUF buffers for one region."""
        return [self._free.pop() if self._free else bytearray(CHUNK) for _ in range(NBUF)]

    def give(self, bufs: list[bytearray]) -> None:
        """Buffers no reader or classifier holds a view of any more."""
        self._free.extend(bufs[:max(0, NBUF - len(self._free))])


async def read_chunks(path: str, size: int, send: trio.MemorySendChannel,
                       ranges: list[tuple[int, int]] | None, bufs: list[bytearray]) -> None:
    """Send (offset, data) for the whole file, or for the byte ``ranges``
    (each at most CHUNK).  ``data`` is a view of a reused buffer: valid until
    the receiver asks for the item NBUF - 2 after it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ranges is None:
            ranges = [(off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
        else:
            # A file in a memfs mount: no read-ahead, which would fault in
            # the neighbours we must not touch.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        async with send:
            # one thread hop per CHUNK bytes, however small the ranges
            batch: list[tuple[int, int]] = []
            batch_bytes = 0
            nbatch = 0
            for i, (off, n) in enumerate(ranges):
                batch.append((off, n))
                batch_bytes += n
                last = i == len(ranges) - 1
                if last or batch_bytes + ranges[i + 1][1] > CHUNK:
                    buf = memoryview(bufs[nbatch % NBUF])
                    nbatch += 1
                    await trio.to_thread.run_sync(_pread_ranges, fd, batch, buf)
                    at = 0
                    for o, k in batch:
                        await send.send((o, buf[at:at + k]))
                        at += k
                    batch, batch_bytes = [], 0
    finally:
        os.close(fd)


def _pread_ranges(fd: int, ranges: list[tuple[int, int]], buf: memoryview) -> None:
    at = 0
    for off, n in ranges:
        _pread_full(fd, off, buf[at:at + n])
        at += n


def _pread_full(fd: int, off: int, into: memoryview) -> None:
    done = pread_into(fd, off, into)
    if done != len(into):
        raise CaptureError(f"RAM file ended early at {off + done}")
