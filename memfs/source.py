"""The mount as a migration source: its volume, the background copy of the
pages its guest writes, and the page maps it hands out (flush, base, delta).

Why a module of its own: the daemon's lifecycle (mount, serve, stop) and a
mount's source side (memfs.sync copies dirty pages, memfs.handover splits the
hand-over into base and delta) change for different reasons.  The daemon
owns a ``Source`` and passes it the control commands it knows.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AsyncExitStack

import trio

from . import handover
from . import volume as volumes
from .disks import Disk, open_disk
from .pagemap import PageMap, PageState
from .pages import PageServer
from .report import parse_size
from .stats import Stats
from .sync import VolumeSync, export, export_delta
from .trace import pack_pages

log = logging.getLogger("memfs.source")

#: the control commands a Source answers
COMMANDS = ("flush", "sync", "sync-pause", "sync-resume", "sync-rate", "volume", "base", "delta")


class SourceError(Exception):
    """A source-side command cannot be done; the message says why."""


class Source:
    """Copies what the guest writes to a volume and makes page maps of it."""

    def __init__(self, pages: PageServer, stats: Stats, mountpoint: str,
                 stack: AsyncExitStack, *, rate: float | None = None, interval: float = 1.0,
                 paused: bool = False) -> None:
        self.pages = pages
        self.stats = stats
        self.mountpoint = mountpoint
        self._stack = stack
        self.rate, self.interval, self.paused = rate, interval, paused
        self.sync: VolumeSync | None = None
        #: the base this mount handed out, for its delta (memfs.handover)
        self.base_id: str | None = None
        #: the volume's identity and where it lies (memfs.volume)
        self.volume_id: tuple[str, int] = ("", 0)

    async def control(self, cmd: str, arg: str, nursery: trio.Nursery) -> None:
        """One of ``COMMANDS``."""
        if cmd == "volume":
            await self.attach_volume(arg, nursery)
            return
        sync = self.sync
        if sync is None:
            raise SourceError("no volume: mount with --volume URI or send 'volume URI'")
        if cmd == "sync-pause":
            sync.paused = True
        elif cmd == "sync-resume":
            sync.paused = False
        elif cmd == "sync-rate":
            sync.rate = parse_size(arg) or None
        elif cmd == "sync":
            await self.fsync_regions()
            await sync.copy_dirty()
        elif cmd == "base":
            await self.write_base(arg)
        elif cmd == "delta":
            await self.flush(arg, delta=True)
        else:
            if not os.path.isabs(arg):
                raise SourceError("flush needs an absolute path")
            await self.flush(arg)

    async def attach_volume(self, uri: str, nursery: trio.Nursery) -> None:
        """Copy written pages to ``uri`` from now on."""
        if self.sync is not None:
            if self.sync.volume.uri == uri:
                return
            raise SourceError(f"pages already go to volume {self.sync.volume.uri}")
        await self.pages.installed.wait()
        pm = self.pages.pagemap
        assert pm is not None
        if uri in pm.disks and any(PageState.REMOTE in r.states for r in pm.regions):
            raise SourceError(f"volume {uri} is a disk of the page map: copying pages there "
                              "would overwrite what its remote pages refer to")
        volume = await self.open_volume(uri)
        self.sync = VolumeSync(self.pages, volume, self.stats, self.fsync_regions,
                               rate=self.rate, interval=self.interval)
        self.sync.paused = self.paused
        nursery.start_soon(self.sync.run, name="sync")
        log.info("written pages go to volume %s", uri)

    async def open_volume(self, uri: str) -> Disk:
        """Open (or create) the volume and learn (or write) its identity."""
        sizes = list(self.pages.sizes.values())
        end = volumes.layout(sizes)[-1]
        disk = await open_disk(uri, writable=True, create_size=end)
        self._stack.push_async_callback(disk.aclose)
        if disk.size < end:
            raise SourceError(f"volume {uri} holds {disk.size} bytes; the regions need {end}")
        at = volumes.identity_offset(sizes)
        self.volume_id = (await volumes.ensure_identity(disk, at), at)
        return disk

    async def fsync_regions(self) -> None:
        """Make the kernel write back every dirty page of every region (from a
        worker thread: the WRITEs it sends are served by the daemon's loop)."""
        def work() -> None:
            for name in self.pages.sizes:
                fd = os.open(os.path.join(self.mountpoint, name), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        await trio.to_thread.run_sync(work)

    async def write_base(self, path: str) -> None:
        """A base page map while the guest runs (memfs.handover): the pages
        dirty now and every page copied from now on go into the delta."""
        assert self.sync is not None and self.pages.pagemap is not None
        await self.fsync_regions()
        await self.sync.copy_dirty()
        async with self.sync.copying:  # no copy half done
            # no await from the export to the copy of the dirty bits: one state
            pm = export(self.pages.pagemap, 0, allow_dirty=True)
            self.sync.changed = {n: bytearray(b) for n, b in self.pages.dirty.bits.items()}
            self.base_id = handover.mark_base(pm)
        self._final_meta(pm)
        await trio.to_thread.run_sync(pm.save, path)
        log.info("base page map %s written to %s", self.base_id, path)

    def _final_meta(self, pm: PageMap, copied: dict[str, list[int]] | None = None) -> None:
        """What a page map from this mount says beside its pages."""
        assert self.sync is not None and self.pages.pagemap is not None
        vols = self.pages.pagemap.meta.get(volumes.META_KEY, {})
        pm.meta.update({"created": time.time(), "source": "mount",
                        "volume": self.sync.volume.uri, "mountpoint": self.mountpoint,
                        volumes.META_KEY: {u: v for u, v in vols.items() if u in pm.disks}})
        if copied is not None:
            # what the guest was busy writing: the destination fetches it first
            pm.meta["hot"] = {n: pack_pages(sorted(set(p))) for n, p in copied.items()}
        volumes.record(pm.meta, self.sync.volume.uri, *self.volume_id)

    async def flush(self, path: str, delta: bool = False) -> PageMap:
        """Write back, copy what is dirty, and save a page map whose every
        page is zero or remote (a volume or the disk it came from); with
        ``delta``, only the entries that changed since the base."""
        sync = self.sync
        assert sync is not None and self.pages.pagemap is not None
        if delta and (self.base_id is None or sync.changed is None):
            raise SourceError("no base page map: send 'base PATH' first")
        t0 = time.perf_counter()
        await self.fsync_regions()
        t1 = time.perf_counter()
        sync.record = copied = {}
        try:
            for _ in range(8):
                await sync.copy_dirty()
                if not self.pages.dirty.count:
                    break
        finally:
            sync.record = None
        try:  # no await between the check and the copy: one consistent state
            if delta:
                assert self.base_id is not None and sync.changed is not None
                pm = export_delta(self.pages.pagemap, self.pages.dirty.count, sync.changed,
                                  self.base_id)
                sync.changed = self.base_id = None
            else:
                pm = export(self.pages.pagemap, self.pages.dirty.count)
        except ValueError as e:
            raise SourceError(f"{e}: the guest writes faster than pages are copied; "
                              "stop it first") from None
        self._final_meta(pm, copied)
        t2 = time.perf_counter()
        await trio.to_thread.run_sync(pm.save, path)
        t3 = time.perf_counter()
        log.info("flushed: page map %s, %s; write-back %.1f ms, copy %.1f ms (%d pages), "
                 "page map %.1f ms (volume flush %.1f ms)", path, pm.counts(), (t1 - t0) * 1e3,
                 (t2 - t1) * 1e3, sum(len(v) for v in copied.values()), (t3 - t2) * 1e3,
                 sync.flush_seconds * 1e3)
        return pm
