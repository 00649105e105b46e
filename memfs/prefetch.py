"""Background completion: stream the remaining remote pages, then push them.

Once the page map is installed, every remote page is fetched in disk order
(a working-set trace's pages first) with large coalesced reads at prefetch
priority, kept in the local store (its source bit cleared), and — unless it
was ever served — pushed into the kernel's page cache with notify_store, so
that the guest's first touch is a page-cache hit.  When no page is remote the
disk is no longer needed, and the log says so.

DESIGN.md invariant 3 is kept by the page server's ``served`` set
(memfs.served): every page is taken from it just before its push, and one a
READ reached is never pushed.  Here, two more checks: a page the kernel holds
(cachestat(2) on the region file) is not pushed either; and a push runs in a
worker thread, never on the trio loop, because notify_store waits for page
locks that a pending READ holds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Callable, Iterator

import trio

from .pagemap import PageState, Region
from .pages import PageServer
from .served import ServedPages
from .stats import Stats
from .trace import Trace

log = logging.getLogger("memfs.prefetch")

REMOTE = PageState.REMOTE
LOCAL = PageState.LOCAL
ZERO = PageState.ZERO
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


#: pyfuse3.notify_store's signature: (inode, offset, data)
NotifyStore = Callable[[int, int, bytes | memoryview], None]


def _notify_store(inode: int, offset: int, data: bytes | memoryview) -> None:
    import pyfuse3
    pyfuse3.notify_store(inode, offset, data)


class Prefetcher:
    """``residency`` and ``notify_store`` reach the kernel; tests without a
    mount pass their own."""

    def __init__(self, pages: PageServer, stats: Stats, *, mountpoint: str | None,
                 inode_of: Callable[[str], int], push: bool = True,
                 rate: float | None = None, batch: int = 4 << 20, depth: int = 3,
                 trace: Trace | None = None,
                 residency: Callable[[str], Residency] = Residency,
                 notify_store: NotifyStore = _notify_store) -> None:
        self.pages = pages
        self.residency = residency
        self.notify_store = notify_store
        self.stats = stats
        self.mountpoint = mountpoint
        self.inode_of = inode_of
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
        order = sorted(range(region.npages), key=lambda p: (region.disks[p], region.offsets[p])) \
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
            kept, got = await self.pages.prefetch(region, chunk)
            self.stats.add("pages_prefetched", len(kept))
            if res is not None and kept:
                await self._push(region, res, kept, got)
            if self.rate:
                spent = time.monotonic() - t
                await trio.sleep(max(0.0, len(chunk) * region.page_size / self.rate - spent))
        finally:
            slots.release()

    async def _push(self, region: Region, res: Residency, kept: list[int],
                    got: dict[int, memoryview]) -> None:
        """Push the kept pages, and the zero pages between them (a lone zero
        page left out would cost the guest a 4 KiB READ of its own).

        Page by page, each checked just before its push: notify_store
        overwrites whatever the page cache holds, so a page that a READ
        reached (served) or that the kernel allocated for a read (cached) is
        skipped (memfs.served says what remains of the race).
        """
        name = region.name
        served = self.pages.served
        states = region.states
        lo, hi = kept[0], kept[-1] + 1
        todo = [p for p in range(lo, hi) if not served.is_served(name, p)
                and (p in got and states[p] == LOCAL or states[p] == ZERO)]
        if not todo:
            return
        inode = self.inode_of(name)
        with served.pushing(name, lo, hi):
            try:
                n = await trio.to_thread.run_sync(
                    _push_pages, self.notify_store, inode, region.page_size, todo, got,
                    served, name, res)
                self.stats.add("pages_pushed", n)
            except OSError as e:
                self.stats.add("push_errors")
                log.warning("prefetch: notify_store failed for %s: %s", name, e)


def _push_pages(notify_store: NotifyStore, inode: int, ps: int, pages: list[int],
                got: dict[int, memoryview], served: ServedPages, name: str,
                res: Residency) -> int:
    """Runs in a worker thread: notify_store may wait for a page lock that a
    READ holds, and that READ needs the trio loop.  A page is taken from
    ``served`` (tested and set under its lock) just before its push."""
    zero = bytes(ps)
    n = 0
    for p in pages:
        if served.is_served(name, p) or res.cached(p * ps, ps):
            continue
        if not served.take_for_push(name, p):  # a READ came first
            continue
        notify_store(inode, p * ps, got.get(p, zero))
        n += 1
    return n


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
    offs, disks = region.offsets, region.disks
    prev = -1
    for p in range(0, n, max(1, n // 64)):
        if region.states[p] != REMOTE:
            continue
        key = (disks[p] << 56) + offs[p]
        if key < prev:
            return False
        prev = key
    return True
