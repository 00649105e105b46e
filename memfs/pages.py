"""Region I/O: what a READ or WRITE of a region file means, without FUSE.

This is where DESIGN.md's invariants live: a READ returns verified captured
content or the last written content, never zeros for a non-zero page and
never a short read; a written page is never overwritten by remote data; I/O
that arrives before the page map waits for it.  The filesystem layer only
translates these calls and their errors.
"""

from __future__ import annotations

import errno
import logging
import time
from array import array
from typing import Any, Protocol, Sequence

import trio

from ._fast import scatter, span
from .dirty import DirtySet
from .fetch_plan import stretches
from .fetcher import Fetcher, FetchError, remote_pages
from .held import HeldPages
from .pagemap import PageMap, PageMapError, PageState, Region
from .served import ServedPages
from .stats import Stats
from .store import LocalStore, page_writes
from .trace import Trace

log = logging.getLogger("memfs.pages")
LOCAL = PageState.LOCAL
REMOTE = PageState.REMOTE
ZERO = PageState.ZERO


class PageIOError(Exception):
    """A region READ/WRITE failed; ``errno`` is what the kernel should see."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class PageJournal(Protocol):
    """Where page-state changes go before they count (memfs.state.Journal)."""

    def wrote(self, region: Region, first: int, count: int) -> None: ...
    def kept(self, region: Region, pages: list[int]) -> None: ...


class _NoJournal:
    def wrote(self, region: Region, first: int, count: int) -> None:
        pass

    def kept(self, region: Region, pages: list[int]) -> None:
        pass


NO_JOURNAL = _NoJournal()


class PageServer:
    """Serves byte ranges of regions from zero pages, the store and the fetcher."""

    def __init__(self, regions: dict[str, int], store: LocalStore, stats: Stats) -> None:
        #: region name -> size, known before the page map arrives
        self.sizes = dict(regions)
        self.store = store
        self.stats = stats
        self.pagemap: PageMap | None = None
        self.fetcher: Fetcher | None = None
        self.installed = trio.Event()
        #: pages handed to the kernel (a READ, or the kernel reading a push in)
        self.served = ServedPages()
        #: first-demand order of pages, for a later mount's prefetch
        self.trace = Trace()
        #: where deferred store writes run (``run_background``); None: inline
        self._background: trio.Nursery | None = None
        self._deferred = 0
        self._locks: dict[str, trio.Lock] = {n: trio.Lock() for n in regions}
        #: pages written since a volume last received them (memfs.sync)
        self.dirty = DirtySet({n: s // 4096 for n, s in regions.items()})
        #: memfs.state.Journal: told of every page made LOCAL before it counts
        self.journal: PageJournal = NO_JOURNAL
        #: the bytes of pages a prefetch batch kept, while its push runs
        self.held = HeldPages(regions)
        #: fetched pages the store could not keep (full): served unkept
        stats.counters.setdefault("store_write_errors", 0)
        stats.counters.setdefault("pages_push_held_hits", 0)
        for name, size in regions.items():
            store.open_region(name, size)
        stats.gauges.append(self._gauges)

    # -- page map hand-over (DESIGN.md invariant 4) --------------------------

    def install(self, pagemap: PageMap, fetcher: Fetcher) -> None:
        """Make ``pagemap`` current; I/O that was waiting for it proceeds."""
        if self.installed.is_set():
            raise PageMapError("a page map is already installed")
        have = {r.name: r.size for r in pagemap.regions}
        if have != self.sizes:
            raise PageMapError(f"page map regions {have} do not match the mounted regions "
                               f"{self.sizes}")
        for r in pagemap.regions:
            if r.count(LOCAL):
                raise PageMapError(f"region {r.name!r} has local pages: they belong to the "
                                   "store of another mount")
            self.served.add_region(r.name, r.npages)
            r.start_tally(len(pagemap.disks))
        self.pagemap = pagemap
        self.fetcher = fetcher
        self.installed.set()
        log.info("page map installed: %s", pagemap.counts())

    def view(self) -> PageMap:
        """The mount's page map as an onward capture must see it (``save``).

        A page stays REMOTE only if it was never served: the kernel never had
        it, so neither can the guest have changed it, and its location still
        holds its content.  A page stays ZERO only if it was never served
        either.  Every other page is LOCAL: the store or the page cache (maybe
        dirty) holds its content, and a capture has to read it; it keeps the
        location and checksum it arrived with, so a capture that finds the
        same checksum may point at that location again.  The copy is taken in
        one go on the trio loop, so it is consistent.
        """
        if self.pagemap is None:
            raise PageMapError("no page map installed")
        out = PageMap(disks=list(self.pagemap.disks), meta={"view": "mount"})
        if "volumes" in self.pagemap.meta:  # the volumes' identities travel on
            out.meta["volumes"] = self.pagemap.meta["volumes"]
        for r in self.pagemap.regions:
            states = bytearray(r.states)
            for at, end in self.served.runs(r.name):
                states[at:end] = bytes([LOCAL]) * (end - at)
            out.regions.append(Region(r.name, r.size, r.page_size, states, bytearray(r.disks),
                                      r.offsets.copy(), array("Q", r.checksums)))
        return out

    async def _region(self, name: str) -> Region:
        if not self.installed.is_set():
            self.stats.add("reads_waited_for_pagemap")
            log.info("I/O on %s waits for the page map", name)
            await self.installed.wait()
        assert self.pagemap is not None
        return self.pagemap.region(name)

    def lock(self, name: str) -> trio.Lock:
        """The lock under which a region's page states change."""
        return self._locks[name]

    def _gauges(self) -> dict[str, object]:
        if self.pagemap is None:
            return {"pagemap_installed": 0, "pages_dirty": self.dirty.count,
                    "pages_total": sum(s // 4096 for s in self.sizes.values())}
        out: dict[str, object] = {"pagemap_installed": 1, "pages_dirty": self.dirty.count,
                                  "pages_written_back": self.dirty.marked}
        # counters moved by every state change, never a walk over the pages
        pm = self.pagemap
        total = zero = local = remote = on_volume = 0
        volume = pm.meta.get("volume") if isinstance(pm.meta, dict) else None
        vol = pm.disks.index(volume) if volume in pm.disks else (0 if pm.disks else -1)
        for r in pm.regions:
            t = r.tally
            assert t is not None
            total += r.npages
            zero += t.zero
            local += t.local
            remote += t.remote_total
            if vol >= 0:
                on_volume += t.remote[vol]
        out.update(pages_total=total, pages_zero=zero, pages_remote=remote, pages_local=local,
                   pages_served=self.served.count(),
                   pages_on_volume=on_volume, pages_on_disks=remote - on_volume)
        return out

    def mark_served(self, name: str, first: int, end: int) -> None:
        """Pages [first, end) of ``name`` are served (a resumed mount: all)."""
        self.served.mark(name, first, end)

    async def run_background(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run deferred store writes until cancelled (the daemon starts this
        with ``nursery.start``); while it does not run, they run inline."""
        try:
            async with trio.open_nursery() as nursery:
                self._background = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._background = None

    # -- READ ------------------------------------------------------------------

    async def read(self, name: str, offset: int, size: int) -> bytes | bytearray | memoryview:
        t0 = time.perf_counter()
        region = await self._region(name)
        end = min(offset + size, region.size)
        if offset >= end:
            return b""
        ps = region.page_size
        first, last = offset // ps, (end + ps - 1) // ps
        # Served from the moment the READ arrives (the kernel may hold these
        # pages dirty from now on: the state journal must know).
        self.served.mark(name, first, last)
        data = await self._read_pages(region, first, last - first)
        self.stats.add("reads")
        self.stats.add("bytes_read", end - offset)
        self.stats.record_read(time.perf_counter() - t0)
        lo = offset - first * ps
        if lo == 0 and len(data) == end - offset:
            return data  # whole pages (the kernel's usual READ): no copy
        return data[lo:lo + end - offset]

    async def _read_pages(self, region: Region, first: int,
                          count: int) -> bytes | bytearray | memoryview:
        """``count`` whole pages from ``first``: all verified, or PageIOError."""
        ps = region.page_size
        states = region.states[first:first + count]
        if not any(states):
            return bytes(count * ps)
        got: dict[int, memoryview] = {}
        fresh: list[int] = []
        if REMOTE in states:
            self.stats.add("faults")
            pages = remote_pages(region, first, count)
            self.trace.record(region.name, region.npages, pages)
            fresh = await self._fetch_into(region, got, pages, defer=True)
            if len(fresh) == count:  # all fetched and current: answered with the
                whole = span(got, first, count, ps)  # disk's buffer if they lie in order
                if whole is not None:
                    return whole
        buf = bytearray(count * ps)
        scatter(buf, first, ps, got)  # one call, not a slice per page
        await self._copy_local(region, first, count, buf, skip=fresh)
        return buf

    async def _fetch_into(self, region: Region, into: dict[int, memoryview],
                          pages: list[int], defer: bool = False) -> list[int]:
        """Fetch ``pages`` (their views go ``into``); return those whose bytes
        are current (the others were written meanwhile: read the store).

        ``defer`` moves the store write off the READ's critical path: the
        pages stay REMOTE until it lands, and ``keep`` re-checks under the
        lock, so a write that comes first still wins."""
        assert self.fetcher is not None
        own: set[int] = set()
        try:
            got = await self.fetcher.fetch(region, pages, own=own)
        except FetchError as e:
            self.stats.add("read_errors")
            # verified neighbours are still worth keeping for the next READ
            await self.keep(region, e.partial)
            raise PageIOError(errno.EIO, str(e)) from None
        into.update(got)
        # Pages another fetch brought (joined, or fetched and not yet stored)
        # are kept here and now, behind that fetch's own store write: a READ
        # answers once its pages are stored, as when it fetched them itself.
        if defer and len(own) == len(got) and self._background is not None \
                and self._deferred < 64:
            self._deferred += 1
            self._background.start_soon(self._keep_later, region, got)
            states = region.states
            return [p for p in got if states[p] == REMOTE]
        return await self.keep(region, got)

    async def _keep_later(self, region: Region, got: dict[int, memoryview]) -> None:
        try:
            await self.keep(region, got)
        except OSError as e:  # the page stays REMOTE: fetched again next time
            log.error("local store write failed: %s", e)
        finally:
            self._deferred -= 1

    async def keep(self, region: Region, got: dict[int, memoryview],
                   hold: bool = False) -> list[int]:
        """Move fetched pages to the local store and clear their source bit.

        Under the region lock, and only for pages still remote: a page the
        guest wrote meanwhile is never overwritten (invariant 2).
        """
        try:
            return await self._keep(region, got, hold)
        finally:  # kept or not, the page state says from now on
            if self.fetcher is not None:
                self.fetcher.settled(region, got)

    async def prefetch(self, region: Region, pages: list[int], *, hold: bool = False) -> list[int]:
        """Fetch ``pages`` at prefetch priority and keep them: the pages kept.
        A failure is logged, not raised: the pages that failed stay remote
        and a READ fetches them again.
        ``hold``: READs take the kept pages' bytes until ``held.release``."""
        assert self.fetcher is not None
        try:
            got = await self.fetcher.fetch(region, pages, prefetch=True)
        except FetchError as e:
            got = e.partial
            log.error("prefetch: %s", e)
        return await self.keep(region, got, hold)

    async def _keep(self, region: Region, got: dict[int, memoryview],
                    hold: bool = False) -> list[int]:
        ps = region.page_size
        states = region.states
        async with self._locks[region.name]:
            pages = sorted(p for p in got if states[p] == REMOTE)
            spans = stretches(pages)
            # few large writes: small runs of zero pages between written as zeros
            writes = page_writes(ps, spans, got, lambda a, b: not any(states[a:b]))
            try:
                if writes:
                    await self.store.write_many(region.name, writes)
                self.journal.kept(region, pages)
            except OSError as e:  # store full: the pages stay remote, served unkept
                self.stats.add("store_write_errors")
                log.warning("%s: %d fetched pages not kept: %s", region.name, len(pages), e)
                return []
            for p0, n in spans:
                region.set_states(p0, p0 + n, LOCAL)  # counted per stretch, in C
            if hold:  # still under the lock: a WRITE after this drops them
                self.held.hold(region.name, pages, got)
        return pages

    async def _copy_local(self, region: Region, first: int, count: int, buf: bytearray,
                          skip: Sequence[int] = ()) -> None:
        """Overlay pages that are LOCAL now (read after the fetch: a write that
        raced with it wins), from a push's held bytes or straight from the
        store into ``buf``."""
        ps = region.page_size
        hits, local = self.held.split(region.name, region.states, first, count, set(skip))
        if hits:  # copied before any await: a WRITE cannot slip in between
            scatter(buf, first, ps, hits)
            self.stats.add("pages_push_held_hits", len(hits))
        if not local:
            return
        view = memoryview(buf)
        items = [(p * ps, view[(p - first) * ps:(p - first + n) * ps])
                 for p, n in stretches(local)]
        try:
            await self.store.read_into(region.name, items)
        except OSError as e:
            raise PageIOError(errno.EIO, f"local store read failed: {e}") from None

    async def _store_read(self, name: str, offset: int, length: int) -> bytes:
        try:
            return await self.store.read(name, offset, length)
        except OSError as e:
            raise PageIOError(errno.EIO, f"local store read failed: {e}") from None

    # -- WRITE -----------------------------------------------------------------

    async def write(self, name: str, offset: int, data: bytes) -> int:
        region = await self._region(name)
        end = offset + len(data)
        if end > region.size:
            raise PageIOError(errno.ENOSPC, f"write beyond the end of region {name}")
        if not data:
            return 0
        ps = region.page_size
        first, last = offset // ps, (end + ps - 1) // ps
        partial = {p for p, cut in ((first, offset % ps), (last - 1, end % ps)) if cut}
        # A partial page needs its old content: fetch it first (outside the lock).
        fetched: dict[int, memoryview] = {}
        for p in sorted(partial):
            if region.states[p] == REMOTE:
                await self._fetch_into(region, fetched, [p])
        async with self._locks[name]:
            self.held.drop(name, first, last)  # a push's bytes of them are stale now
            if partial:
                lo = offset - first * ps
                merged = bytearray((last - first) * ps)
                for p in partial:
                    # REMOTE -> LOCAL is one-way: ZERO, LOCAL, or REMOTE if it could not be kept
                    at = (p - first) * ps
                    if region.states[p] == LOCAL:
                        merged[at:at + ps] = await self._store_read(name, p * ps, ps)
                    elif region.states[p] == REMOTE:  # fetched but not kept (store full)
                        merged[at:at + ps] = fetched[p]
                merged[lo:lo + len(data)] = data
                payload: bytes | bytearray = merged
            else:
                payload = data
            try:
                await self.store.write(name, first * ps, payload)
                self.journal.wrote(region, first, last - first)
            except OSError as e:  # nothing kept: the pages stay as they were
                err = errno.ENOSPC if e.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
                raise PageIOError(err, f"local store write failed: {e}") from None
            region.set_states(first, last, LOCAL)
            self.dirty.mark(name, first, last)
        self.stats.add("writes")
        self.stats.add("bytes_written", len(data))
        return len(data)
