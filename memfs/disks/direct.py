"""Reads of a local file with no thread hand-off: O_DIRECT and Linux AIO.

A cold read through ``trio.to_thread`` pays a thread wake-up and a GIL
hand-off on top of the disk: 130-670 µs for a 4 KiB read that the disk
answers in ~50 µs on a loaded two-core host (tools/bench-fault).  Here the
read is submitted to the kernel (``memfs._fast.AIO``: io_submit on an
O_DIRECT descriptor) and its completion arrives on an eventfd that the trio
loop polls like any other fd.  O_DIRECT also keeps the volume out of the
host's page cache: the region file already holds each page once.

One task at a time waits on the eventfd (trio allows one waiter per fd) and
reaps every completion; the others wait on their own event and one of them
takes over when the waiting task has its answer.
"""

from __future__ import annotations

import itertools
import mmap
import os

import trio

from .._fast import AIO, Buffer, pool

#: O_DIRECT wants offsets and lengths in logical blocks (512 B on every
#: device memfs meets; a device that wants more says EINVAL, and the file
#: disk then reads through the page cache instead)
ALIGN = 512
#: reads up to this size land in a pooled buffer and are copied out (a
#: copy of a few KiB is cheaper than an mmap); larger ones are answered
#: with a view of their own buffer (``_fast.Buffer``: memory faulted in
#: once and reused when its last view is gone), not copied
SMALL = 128 << 10
POOL = 16
DEPTH = 256
#: read-ahead windows: from RA_MIN, twice the last read, up to RA_MAX;
#: RA_DEPTH of them ahead of the reader (one is not ready in time: a READ at
#: each window's start waited 3-6 ms for the disk); for 1 MiB READs,
#: windows of RA_LARGE_WINDOW, RA_DEPTH_LARGE ahead (a READ at a window's
#: start waits for less than a 4 MiB window: in-process 1 MiB READs in order
#: 510-650 MiB/s against 390-570; 1 MiB windows were slower, 340-460);
#: at most RA_WINDOWS kept; a read this far past the end of one of the last
#: RA_STREAMS streams of reads is in order (two readers in order at once, such
#: as two vCPUs, broke one stream's order at every switch: with a second
#: reader running ahead of a guest's READs, read-ahead hits rose from 165-240
#: to 230-294 of ~300 READs with four streams)
RA_MIN, RA_MAX, RA_DEPTH, RA_WINDOWS, RA_STREAMS = 256 << 10, 4 << 20, 2, 12, 4
RA_LARGE_WINDOW, RA_DEPTH_LARGE = 2 << 20, 4
GAP = 64 << 10
#: reads up to RA_TRIGGER start read-ahead; larger ones up to RA_LARGE (a
#: FUSE READ's 1 MiB) only once RA_STREAK bytes were read in order before
#: them: a sequential first touch, not a huge-page fault (four 1 MiB READs,
#: then elsewhere); the prefetcher's larger batches read their next batch
#: themselves
RA_TRIGGER, RA_LARGE, RA_STREAK = 256 << 10, 1 << 20, 4 << 20
#: idle read buffers the pool keeps (``_fast.pool``): READs whose buffers
#: wait for their store writes come in bursts; a second with no read takes
#: gives them all back (``_give_back_idle``)
POOL_BYTES = 32 << 20
pool(POOL_BYTES)
_giving_back = trio.lowlevel.RunVar("memfs_direct_give_back", default=False)


async def _give_back_idle() -> None:
    """Unmap the pooled read buffers once no read took one for a second:
    the pool is for bursts of reads, not memory kept for ever."""
    last = None
    while True:
        await trio.sleep(1.0)
        idle, _, made, reused = pool()
        if idle and (made, reused) == last:
            pool(0)
            pool(POOL_BYTES)
        last = made, reused


def _buffer(length: int) -> Buffer:
    """A read buffer, from the pool if it has one of this size."""
    if not _giving_back.get():
        _giving_back.set(True)
        trio.lowlevel.spawn_system_task(_give_back_idle, name="memfs-direct-buffers")
    return Buffer(length)


def _anon(length: int) -> mmap.mmap:
    """A page-aligned buffer for the small reads' pool (private anonymous
    memory: a shared one is a shmem file, every page pinned for the read
    allocated, zeroed and indexed in it)."""
    return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE)


class _Window:
    """One read-ahead read: its bytes once the kernel has them."""

    def __init__(self, start: int, end: int, key: int, buf: Buffer) -> None:
        self.start, self.end, self.key = start, end, key
        self.view = memoryview(buf)
        self.res: int | None = None
        self.ready: trio.Event | None = None

    async def wait(self, reader: "DirectReader") -> int:
        """Bytes read into the window (or -errno); any number of waiters."""
        if self.res is not None:
            return self.res
        if self.ready is not None:  # another task waits for the kernel
            await self.ready.wait()
            return self.res if self.res is not None else -1
        self.ready = trio.Event()
        try:
            self.res = await reader._wait(self.key)
        except BaseException:
            reader.abandon(self.key)
            self.res = -1
            raise
        finally:
            self.ready.set()
        return self.res

    def drop(self, reader: "DirectReader") -> None:
        """Forget the window; its read, if still in flight, is abandoned."""
        if self.res is None and self.ready is None:
            reader.abandon(self.key)


class DirectReader:
    """AIO reads of one O_DIRECT descriptor; ``read`` is trio-async."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._aio = AIO(DEPTH)
        self._keys = itertools.count()
        self._done: dict[int, int] = {}
        self._waiters: dict[int, trio.Event] = {}
        self._abandoned: set[int] = set()
        self._leading = False
        self._pool: list[mmap.mmap] = []
        #: where the last read ended, and the read-ahead windows (oldest first)
        #: [where a stream of reads in order ended, bytes it read], newest last
        self._streams: list[list[int]] = []
        self._windows: list[_Window] = []
        self.size = os.fstat(fd).st_size
        self._stats = {"direct_readahead_hits": 0, "direct_readahead_bytes": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Read-ahead hits and bytes; the process's read buffers (fresh
        mappings against buffers taken from the pool)."""
        _, _, made, reused = pool()
        return dict(self._stats, direct_buffers_made=made, direct_buffers_reused=reused)

    @classmethod
    def open(cls, fd: int) -> "DirectReader | None":
        """A reader of the file ``fd`` is open on, or None where O_DIRECT
        does not work (tmpfs, some FUSE file systems)."""
        try:
            dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            probe = mmap.mmap(-1, mmap.PAGESIZE)
            os.preadv(dfd, [probe], 0)  # EINVAL here if O_DIRECT reads are refused
            return cls(dfd)
        except OSError:
            os.close(dfd)
            return None

    def fits(self, offset: int, length: int) -> bool:
        return length > 0 and offset % ALIGN == 0 and length % ALIGN == 0 \
            and self._aio.inflight < DEPTH - 2

    async def read(self, offset: int, length: int) -> tuple[bytes | memoryview, int]:
        """(data, bytes read or -errno).  Fewer bytes than ``length`` means
        the end of the file (the caller decides what that is worth).

        Read-ahead: O_DIRECT has none, and a guest touching its RAM in
        order asks one window at a time (the FUSE file's read-ahead).  A read
        that starts where the last one ended (or a short gap after: zero
        pages are not on the volume) sends the next window ahead of it; a
        read inside a window is answered from it."""
        streak = self._in_order(offset, length)
        seq = length <= RA_TRIGGER or (length <= RA_LARGE and streak >= RA_STREAK)
        seq = seq and streak >= 0
        for w in self._windows:
            if w.start <= offset and offset + length <= w.end:
                res = await w.wait(self)
                if res == w.end - w.start:
                    self._stats["direct_readahead_hits"] += 1
                    if seq:
                        self._ahead(w.end, max(w.end - w.start, length), length)
                    at = offset - w.start
                    view = w.view[at:at + length]
                    return (bytes(view) if length <= SMALL else view), length
                break  # failed or short: read it plainly
        if seq:
            self._ahead(offset + length, length, length)
        return await self._read(offset, length)

    def _in_order(self, offset: int, length: int) -> int:
        """Bytes read in order before this read (-1: it starts a new stream)."""
        for s in self._streams:
            if 0 <= offset - s[0] <= GAP:
                streak = s[1]
                s[0], s[1] = offset + length, streak + length
                self._streams.remove(s)
                self._streams.append(s)
                return streak
        self._streams = [*self._streams[1 - RA_STREAMS:], [offset + length, length]]
        return -1

    def _ahead(self, start: int, last: int, length: int) -> None:
        """Send the windows from ``start`` on that are not sent yet (after
        a window or read of ``last`` bytes, for reads of ``length``)."""
        large = length > RA_TRIGGER
        for _ in range(RA_DEPTH_LARGE if large else RA_DEPTH):
            w = next((w for w in self._windows if w.start <= start < w.end), None) \
                or self._send(start, RA_LARGE_WINDOW if large else
                              min(max(2 * last, RA_MIN), RA_MAX))
            if w is None:
                return
            start, last = w.end, w.end - w.start

    def _send(self, start: int, size: int) -> _Window | None:
        """The window of about ``size`` from ``start``, sent (None: at the
        end, or no room)."""
        step = min(size, RA_LARGE)  # windows end on READ boundaries: READs fit in one
        end = min(-(-(start + size) // step) * step, self.size - self.size % ALIGN)
        if end - start < ALIGN or self._aio.inflight >= DEPTH - 2:
            return None
        buf = _buffer(end - start)
        key = next(self._keys)
        self._aio.submit(self.fd, buf, start, key)
        self._stats["direct_readahead_bytes"] += end - start
        w = _Window(start, end, key, buf)
        self._windows.append(w)
        while len(self._windows) > RA_WINDOWS:
            self._windows.pop(0).drop(self)
        return w

    async def _read(self, offset: int, length: int) -> tuple[bytes | memoryview, int]:
        small = length <= SMALL
        buf: mmap.mmap | Buffer
        if small:
            buf = self._pool.pop() if self._pool else _anon(SMALL)
        else:
            buf = _buffer(length)
        key = next(self._keys)
        view = memoryview(buf)[:length]
        self._aio.submit(self.fd, view, offset, key)
        try:
            res = await self._wait(key)
        except BaseException:
            self.abandon(key)  # the kernel may still write into buf: never reuse it
            raise
        if not small:
            return view, res
        data = bytes(view[:max(res, 0)])
        view.release()
        if len(self._pool) < POOL:
            self._pool.append(buf)
        return data, res

    async def _wait(self, key: int) -> int:
        if key not in self._done:  # done already? no trip through the loop then
            self._reap(clear=False)  # (the eventfd stays set for the task on it)
        while key not in self._done:
            if not self._leading:
                self._leading = True
                try:
                    while key not in self._done:
                        await trio.lowlevel.wait_readable(self._aio.fd)
                        self._reap()
                finally:
                    self._leading = False
                    if self._waiters:  # someone else must watch the eventfd now
                        self._waiters.pop(next(iter(self._waiters))).set()
            else:
                ev = self._waiters[key] = trio.Event()
                try:
                    await ev.wait()
                finally:
                    self._waiters.pop(key, None)
        return self._done.pop(key)

    def abandon(self, key: int) -> None:
        """Nobody wants the result of ``key`` any more."""
        if self._done.pop(key, None) is None:
            self._abandoned.add(key)

    def _reap(self, clear: bool = True) -> None:
        for key, res in self._aio.reap(clear):
            if key in self._abandoned:
                self._abandoned.discard(key)
                continue
            self._done[key] = res
            ev = self._waiters.pop(key, None)
            if ev is not None:
                ev.set()

    def close(self) -> None:
        """Waits for reads still in flight (their buffers are the kernel's)."""
        if self.fd >= 0:
            self._aio.close()
            os.close(self.fd)
            self.fd = -1
