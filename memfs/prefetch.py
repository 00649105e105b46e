"""Background completion: stream the remaining remote pages, then push them.

Once the page map is installed, every remote page is fetched in disk order
(a working-set trace's pages first) with large coalesced reads at prefetch
priority, kept in the local store (its source bit cleared), and pushed into
the kernel's page cache, so that the guest's first touch is a page-cache hit.
When no page is remote the disk is no longer needed, and the log says so.

A push is a read of the region file through the kernel (``read_through``),
not notify_store: the kernel then asks this daemon, with ordinary READs, for
exactly the pages it does not hold, and never replaces one it holds.  That
keeps DESIGN.md invariant 3 by construction.  notify_store cannot: it
overwrites whatever the page cache holds, and a READ the kernel's read-ahead
sends between the push's last check and notify_store's own page lookup is
answered, mapped and perhaps written by the guest before notify_store lands
on it (a guest write lost; seen in mount tests with prefetch on).  Waiting
in that READ for the push is no way out either: notify_store waits for the
very page lock that READ holds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Callable, Iterator

import trio

from .fileio import IOV_MAX
from .pagemap import PageState, Region
from .pages import PageServer
from .stats import Stats
from .trace import Trace

log = logging.getLogger("memfs.prefetch")

REMOTE = PageState.REMOTE
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_CACHESTAT = 451  # x86_64 and the generic table alike (Linux 6.5+)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


class Residency:
    """Which pages of a region file the kernel holds, by cachestat(2).

    No mapping of our own file: unmapping a FUSE mapping writes the inode
    back synchronously while holding the mmap lock, which deadlocks a daemon
    whose loop then needs memory.  The file is opened and closed from a
    worker thread, since both send requests to this very daemon.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.cached(0, 1)
            # twice the mount's read-ahead for this descriptor alone: a push
            # reaches the daemon as half as many READs, twice as large
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            os.close(self.fd)
            raise

    def cached(self, offset: int, length: int) -> int:
        """Pages of [offset, offset+length) in the page cache (any state)."""
        rng, cs = _Range(offset, length), _CacheStat()
        if _libc.syscall(_SYS_CACHESTAT, self.fd, ctypes.byref(rng), ctypes.byref(cs), 0):
            err = ctypes.get_errno()
            raise OSError(err, f"cachestat: {os.strerror(err)}")
        return cs.nr_cache

    def close(self) -> None:
        """Call from a worker thread (see the class docstring)."""
        os.close(self.fd)


#: how a push reaches the kernel: (the region file, offset, length) -> the
#: pages of that range the page cache did not hold before and holds after
Populate = Callable[[Residency, int, int], int]


def read_through(res: Residency, offset: int, length: int) -> int:
    """Read [offset, offset+length) of the region file and throw the bytes
    away: the kernel fills its page cache with READs to this daemon for the
    pages it lacks.  In a worker thread, never on the trio loop, which must
    answer those READs.  The bytes only cross into this buffer: one copy,
    about 1 ms per 4 MiB batch.  One preadv for the whole range (the same
    buffer in every iovec): each system call that waits for the daemon
    gives the GIL up, and taking it back from a busy loop is a wait of its
    own (6 MiB against a spinning thread: 0.52 ms in one call, 0.92 ms in
    six, measured)."""
    before = res.cached(offset, length)
    at, end = offset, offset + length
    while at < end:
        n = os.preadv(res.fd, _iovecs(end - at), at)
        if n <= 0:
            break  # end of file
        at += n
    return max(0, res.cached(offset, length) - before)


def _iovecs(length: int) -> list[memoryview]:
    """``length`` bytes of iovecs, all this thread's one scratch buffer."""
    view = _scratch()
    full, rest = divmod(min(length, _SCRATCH * IOV_MAX), _SCRATCH)
    return [view] * full + ([view[:rest]] if rest else [])


_local = threading.local()
#: the throw-away buffer of each push thread; its size does not bound the
#: READs (the kernel's read-ahead window does)
_SCRATCH = 1 << 20


def _scratch() -> memoryview:
    """This thread's buffer, kept: a fresh one per push was an mmap (glibc's
    threshold is fixed at 1 MiB here), zeroed and faulted in every time."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(_SCRATCH))
    return view


#: batches in flight: 5 completed 256 MiB in 0.73 s (median of 6, file
#: disk) where 3 took 0.87; since a batch is one store write (store.page_writes)
#: 8 beat 5 over NBD in 6 runs of 6 (0.88-1.32 s against 1.26-1.56), file
#: disk the same (medians 0.59/0.51 against 0.59/0.53); daemon RSS after a
#: 1 GiB completion 49.3 MiB against 46.3 (measured on a loaded two-core
#: host, tools/bench's region, alternating)
DEPTH = 8


class Prefetcher:
    """``residency`` and ``populate`` reach the kernel; tests without a
    mount pass their own."""

    def __init__(self, pages: PageServer, stats: Stats, *, mountpoint: str | None,
                 push: bool = True,
                 rate: float | None = None, batch: int = 4 << 20, depth: int = DEPTH,
                 trace: Trace | None = None,
                 residency: Callable[[str], Residency] = Residency,
                 populate: Populate = read_through) -> None:
        self.pages = pages
        self.residency = residency
        self.populate = populate
        self.stats = stats
        self.mountpoint = mountpoint
        self.push = push and mountpoint is not None
        self.rate = rate  # bytes per second, None for unlimited
        self.batch = batch
        self.depth = depth
        self.trace = trace
        self.done = trio.Event()
        self.finished_at: float | None = None

    async def run(self) -> None:
        _big_buffers_from_mmap()
        await self.pages.installed.wait()
        pm = self.pages.pagemap
        assert pm is not None
        t0 = time.monotonic()
        log.info("prefetch: %d remote pages to complete%s", pm.counts()["pages_remote"],
                 " (pushing into the page cache)" if self.push else "")
        for region in pm.regions:
            res = None
            if self.push:
                path = os.path.join(self.mountpoint or "", region.name)
                try:
                    res = await trio.to_thread.run_sync(self.residency, path)
                except OSError as e:
                    log.warning("prefetch: no residency check for %s (%s): not pushing",
                                region.name, e)
            try:
                await self._region(region, res)
            finally:
                if res is not None:
                    # close() sends FLUSH to this very daemon: never on the loop;
                    # shielded: a stopped prefetch must still let go of the
                    # file, or the mount stays busy (memfs umount)
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(res.close)
        left = pm.counts()["pages_remote"]
        self.finished_at = time.monotonic() - t0
        if left == 0:
            log.info("prefetch: every page is local after %.2fs: the disk is no longer "
                     "needed", self.finished_at)
        else:
            log.error("prefetch: %d pages are still remote (fetch errors); the disk is "
                      "still needed", left)
        _release_heap()
        self.done.set()

    def _batches(self, region: Region) -> Iterator[list[int]]:
        """Remote pages in trace order first, then in disk order, batched."""
        per = max(1, self.batch // region.page_size)
        states = region.states
        if self.trace and region.name in self.trace.order:
            hot = [p for p in self.trace.order[region.name] if p < region.npages]
            for i in range(0, len(hot), per):
                chunk = sorted(p for p in hot[i:i + per] if states[p] == REMOTE)
                if chunk:
                    yield chunk
        disks, offs = region.disks, region.offsets.raw  # raw: same order, no call per page
        order = sorted(range(region.npages), key=lambda p: (disks[p], offs[p])) \
            if not _identity_order(region) else range(region.npages)
        chunk: list[int] = []
        for p in order:
            if states[p] == REMOTE:
                chunk.append(p)
                if len(chunk) >= per:
                    yield sorted(chunk)
                    chunk = []
        if chunk:
            yield sorted(chunk)

    async def _region(self, region: Region, res: Residency | None) -> None:
        """Batches in flight side by side (a disk idles between one batch's
        fetch and the next otherwise); one at a time under a rate limit."""
        slots = trio.Semaphore(1 if self.rate else self.depth)
        async with trio.open_nursery() as nursery:
            for chunk in self._batches(region):
                await slots.acquire()  # released by the batch's own task
                nursery.start_soon(self._batch, region, res, chunk, slots)

    async def _batch(self, region: Region, res: Residency | None, chunk: list[int],
                     slots: trio.Semaphore) -> None:
        try:
            chunk = [p for p in chunk if region.states[p] == REMOTE]  # demand may have won
            if not chunk:
                return
            t = time.monotonic()
            push = res is not None
            kept = await self.pages.prefetch(region, chunk, hold=push)
            self.stats.add("pages_prefetched", len(kept))
            if push and kept:
                try:  # its READs are answered from the fetched bytes
                    await self._push(region, res, kept)  # type: ignore[arg-type]
                finally:
                    self.pages.held.release(region.name, kept)
            if self.rate:
                spent = time.monotonic() - t
                await trio.sleep(max(0.0, len(chunk) * region.page_size / self.rate - spent))
        finally:
            slots.release()

    async def _push(self, region: Region, res: Residency, kept: list[int]) -> None:
        """Have the kernel read the batch's range in, with the zero pages
        between its kept pages (a lone zero page left out would cost the
        guest a 4 KiB READ of its own).  The kernel decides which pages it
        lacks; a page it holds (served, perhaps written) is never touched."""
        ps = region.page_size
        lo, hi = kept[0], kept[-1] + 1
        try:
            n = await trio.to_thread.run_sync(self.populate, res, lo * ps, (hi - lo) * ps)
            self.stats.add("pages_pushed", n)
        except OSError as e:  # a READ failed (the store): the guest's own READ retries
            self.stats.add("push_errors")
            log.warning("prefetch: pushing %s pages %d..%d failed: %s", region.name, lo,
                        hi - 1, e)


_M_MMAP_THRESHOLD = -3


def _big_buffers_from_mmap() -> None:
    """Buffers of 1 MiB and more (batches, their store writes) mapped and
    unmapped by glibc, so that freeing one gives it back to the host: with
    glibc's default the threshold grows after the first such free and later
    batches stay in the heaps of the threads that read them, leaving the
    daemon's RSS near its peak after completion (measured: +16..90 MiB for
    a 1 GiB region; with this, +0.3 MiB).  A fixed threshold costs an
    mmap and page faults per batch: a few % of a 4 MiB read."""
    fn = getattr(_libc, "mallopt", None)
    if fn is not None:
        fn(_M_MMAP_THRESHOLD, 1 << 20)


def _release_heap() -> None:
    """What the heaps still hold free goes back to the host at the end."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _identity_order(region: Region) -> bool:
    """True when region order is disk order (capture's identity layout), the
    common case, which saves sorting millions of pages."""
    n = region.npages
    offs, disks = region.offsets.raw, region.disks  # raw: the same order
    prev = -1
    for p in range(0, n, max(1, n // 64)):
        if region.states[p] != REMOTE:
            continue
        key = (disks[p] << 56) + offs[p]
        if key < prev:
            return False
        prev = key
    return True
