"""Background capture: pages the guest wrote are copied to a volume while it runs.

Why: a guest whose RAM is a memfs region tells the daemon, through the
kernel's write-back, exactly which pages it changed (``DirtySet``).  Copying
them to the migration volume in the background, at a rate the operator sets,
keeps the set the volume lacks small; a migration then only has to ``fsync``
the region with the guest stopped, copy the few pages still dirty and hand
over a page map whose every non-zero page points at a volume or at the disk
it came from.  The final pass costs what the guest dirtied, not its RAM size.

Layout on the volume: the identity layout of capture (region i at the sum of
the sizes before it, each rounded to 1 MiB; page p at ``voff + p * 4096``).
The daemon learns of a dirty page only when the kernel writes it back, which
it does on its own only after ``vm.dirty_expire_centisecs`` (30 s); so each
background pass first asks for write-back (``fsync`` of the regions, from a
worker thread).  That write-protects the guest's pages again: its next write
to each costs a page fault — the price of a short final pass.

A page copied twice lands at the same place, so a page map made from a mount
refers to data that stays put only while the guest does not run (invariant
6): ``flush`` is meant for a stopped guest, as migrate and snapshot use it.

One copy runs at a time: two copies of the same page in flight could land on
the volume out of order.  A copy clears the dirty bits of its pages before it
reads them from the store; a WRITE that lands meanwhile marks them again and
they are copied again, so no write is ever missed.
"""

from __future__ import annotations

import logging
import time
from array import array
from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from . import handover
from .volume import layout
from .disks import Disk
from .pagemap import ZERO_CHECKSUM, ZERO_PAGE, PageMap, PageState, Region, checksum

if TYPE_CHECKING:
    from .pages import PageServer
    from .stats import Stats

log = logging.getLogger("memfs.sync")

#: pages per run (one store read, one volume write) and per batch of runs
RUN_PAGES = 256
BATCH_PAGES = 1024


class VolumeSync:
    """Copies dirty pages of a ``PageServer`` to ``volume``."""

    def __init__(self, pages: "PageServer", volume: Disk, stats: "Stats",
                 writeback: Callable[[], Awaitable[None]], rate: float | None = None,
                 interval: float = 1.0) -> None:
        self.pages = pages
        self.volume = volume
        self.stats = stats
        #: makes the kernel send the regions' dirty pages (fsync): without it
        #: they wait for the kernel's own write-back, up to 30 s
        self.writeback = writeback
        #: seconds between two background passes
        self.interval = interval
        #: bytes per second for the background copy; None: as fast as it goes
        self.rate = rate
        self.paused = False
        names = list(pages.sizes)
        offs = layout([pages.sizes[n] for n in names])
        self.voff = dict(zip(names, offs))
        self.volume_end = offs[-1]
        self.passes = 0
        self.writebacks = 0
        self.writeback_seconds = 0.0
        #: how long the last volume flush took
        self.flush_seconds = 0.0
        self._lock = trio.Lock()
        #: while not None: the pages copied, per region (flush reports them)
        self.record: dict[str, list[int]] | None = None
        #: while not None: pages whose entry changed since a base page map
        #: was handed out (memfs.handover), per region
        self.changed: dict[str, bytearray] | None = None
        self._wake = trio.Event()
        stats.gauges.append(self._gauges)

    def _gauges(self) -> dict[str, object]:
        return {"sync_paused": int(self.paused), "sync_rate": int(self.rate or 0),
                "sync_passes": self.passes, "sync_volume": self.volume.uri,
                "sync_writebacks": self.writebacks,
                "sync_writeback_ms": round(self.writeback_seconds * 1000)}

    @property
    def copying(self) -> trio.Lock:
        """Held while pages are being copied: hold it to see no copy half done."""
        return self._lock

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """The background task: every ``interval``, unless paused, write back
        and copy what is dirty."""
        while True:
            t0 = time.monotonic()
            if not self.paused:
                await self.writeback()
                self.writebacks += 1
                self.writeback_seconds += time.monotonic() - t0
                await self.copy_dirty(limited=True)
            self._wake = trio.Event()
            with trio.move_on_after(max(0.0, t0 + self.interval - time.monotonic())):
                await self._wake.wait()

    async def copy_dirty(self, limited: bool = False) -> int:
        """Copy every page dirty now; return how many were copied.  With
        ``limited`` it keeps to the rate and stops when paused."""
        copied = 0
        async with self._lock:
            t0 = time.monotonic()
            for name in list(self.pages.sizes):
                batch: list[tuple[int, int]] = []
                size = 0
                runs = list(self.pages.dirty.runs(name, RUN_PAGES))
                for i, (first, last) in enumerate(runs):
                    batch.append((first, last))
                    size += last - first
                    if size < BATCH_PAGES and i + 1 < len(runs):
                        continue
                    if limited and self.paused:
                        break
                    copied += await self._copy(name, batch)
                    batch, size = [], 0
                    if limited and self.rate:
                        await trio.sleep_until(t0 + copied * 4096 / self.rate)
            if copied:
                t1 = time.monotonic()
                await self.volume.flush()
                self.flush_seconds = time.monotonic() - t1
                self.passes += 1
        return copied

    async def _copy(self, name: str, runs: list[tuple[int, int]]) -> int:
        """Copy the dirty pages of ``runs`` (first, last): one store read and
        one volume write request batch for all of them."""
        pages = self.pages
        assert pages.pagemap is not None
        ps = pages.pagemap.region(name).page_size
        dirty = pages.dirty
        todo = await self._take_dirty(name, runs)
        if not todo:
            return 0

        def undo() -> None:  # under the lock: copy them again next time
            for a, b in todo:
                dirty.mark(name, a, b)

        # Outside the lock: a WRITE that lands now marks its pages dirty again.
        try:
            datas = await pages.store.read_many(name, [(a * ps, (b - a) * ps) for a, b in todo])
        except OSError as e:
            async with pages.lock(name):
                undo()
            log.error("sync: cannot read %s from the store: %s", name, e)
            raise
        voff = self.voff[name]
        try:
            await self.volume.write_many([(voff + a * ps, d) for (a, _), d in zip(todo, datas)])
        except BaseException:
            async with pages.lock(name):
                undo()
            raise
        async with pages.lock(name):
            n = self._copied(name, todo, datas)
        self.stats.add("sync_pages", n)
        self.stats.add("sync_bytes", n * ps)
        return n

    async def _take_dirty(self, name: str, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The dirty span [a, b) of each run, its dirty bits cleared (a WRITE
        from now on marks its page again)."""
        dirty = self.pages.dirty
        todo: list[tuple[int, int]] = []
        async with self.pages.lock(name):
            for first, last in runs:
                bits = dirty.bits[name]
                a = bits.find(1, first, last)
                if a < 0:
                    continue
                b = bits.rfind(1, first, last) + 1
                dirty.clear(name, a, b)
                todo.append((a, b))
        if todo and self.record is not None:
            rec = self.record.setdefault(name, [])
            for a, b in todo:
                rec.extend(range(a, b))
        return todo

    def _copied(self, name: str, todo: list[tuple[int, int]], datas: list[bytes]) -> int:
        """Under the lock: the copied pages now live on the volume, unless
        written again meanwhile (copied again later).  Returns the pages copied."""
        pm = self.pages.pagemap
        assert pm is not None
        region, dirty = pm.region(name), self.pages.dirty
        ps, voff, vol = region.page_size, self.voff[name], pm.disk_index(self.volume.uri)
        changed = self.changed[name] if self.changed is not None else None
        n = 0
        for (a, b), data in zip(todo, datas):
            view = memoryview(data)
            n += b - a
            for i, p in enumerate(range(a, b)):
                if region.states[p] != PageState.LOCAL or dirty.is_dirty(name, p):
                    continue  # written again meanwhile: copied again later
                if changed is not None:
                    changed[p] = 1
                page = view[i * ps:(i + 1) * ps]
                csum = checksum(page)
                if csum == ZERO_CHECKSUM and page == ZERO_PAGE:
                    region.set_zero(p)  # written back as zeros: a zero page again
                    continue
                region.disks[p] = vol
                region.offsets[p] = voff + p * ps
                region.checksums[p] = csum
        return n


def export(pm: PageMap, dirty_count: int, allow_dirty: bool = False) -> PageMap:
    """The page map of a mount whose dirty pages are all copied: every page
    is ZERO or REMOTE at the location that holds its current content (a
    LOCAL page that is not dirty is the copy of what its location holds).

    ``allow_dirty``: a base for a delta (memfs.handover), whose dirty pages'
    entries are stale and are sent again in the delta."""
    if dirty_count and not allow_dirty:
        raise ValueError(f"{dirty_count} pages are still dirty")
    out = PageMap(disks=list(pm.disks))
    local, remote = bytes([PageState.LOCAL]), bytes([PageState.REMOTE])
    for r in pm.regions:
        out.regions.append(Region(r.name, r.size, r.page_size, r.states.replace(local, remote),
                                  bytearray(r.disks), r.offsets.copy(),
                                  array("Q", r.checksums)))
    return out


def export_delta(pm: PageMap, dirty_count: int, changed: dict[str, bytearray],
                 base_id: str) -> PageMap:
    """``export`` for the pages ``changed`` marks only: the delta to the base
    ``base_id`` (memfs.handover)."""
    if dirty_count:
        raise ValueError(f"{dirty_count} pages are still dirty")
    delta = handover.make_delta(pm, changed, base_id)
    local, remote = bytes([PageState.LOCAL]), bytes([PageState.REMOTE])
    for r in delta.regions:
        r.states[:] = r.states.replace(local, remote)
    return delta
