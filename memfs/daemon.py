"""The mount's lifecycle: open disks, mount, serve, unmount, release.

Everything acquired goes on one AsyncExitStack so that an error at any step
(a dead NBD server, a busy mount point) releases what was taken before it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator, Callable, Sequence

import pyfuse3
import trio

from .disks import Disk, open_disk
from .fetcher import Fetcher
from .fs import MemFS
from .control import ControlError, parse_line, writable_target
from .mounttable import describe_mappers, find_mount, mappers
from .mountopts import MountError, MountOptions, check_mountpoint, mount_dev, tune_bdi
from .pagemap import PageMap, PageMapError, Region
from .pages import PageServer
from .prefetch import Prefetcher
from .trace import Trace
from .stats import Stats
from .state import State
from .store import LocalStore
from .volume import check_pagemap as check_volumes
from .takeover import Takeover, detach
from . import handover
from .source import COMMANDS as SOURCE_COMMANDS
from .source import Source

log = logging.getLogger("memfs.daemon")


def dump_stacks_on(sig: int) -> None:
    """``kill -USR1 PID`` writes every thread's stack to the daemon's log: the
    way to see where a hung daemon waits (faulthandler, no lock taken)."""
    for h in logging.getLogger().handlers:
        stream = getattr(h, "stream", None)
        try:
            stream.fileno()  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            continue
        faulthandler.register(sig, file=stream, all_threads=True, chain=False)
        return


class Daemon:
    def __init__(self, opts: MountOptions) -> None:
        self.opts = opts
        self.stats = Stats()
        self.disks: list[Disk] = []
        sizes = ({r.name: r.size for r in opts.pagemap.regions} if opts.pagemap
                 else dict(opts.regions))
        if not sizes:
            raise MountError("nothing to serve: no page map and no --region")
        self.store = LocalStore(opts.store_dir, resume=opts.state_dir is not None)
        self.pages = PageServer(sizes, self.store, self.stats)
        self.stats.gauges.append(self._disk_stats)
        self.fs = MemFS(self.pages, self.stats, self.control, mode=opts.mode)
        self._stack = AsyncExitStack()
        #: set by memfs.supervisor: the held connection, the state directory
        self.takeover: Takeover | None = None
        self.state: State | None = None
        self.pagemap_path = opts.pagemap_path
        self.prefetcher: Prefetcher | None = None
        self.stats.gauges.append(self._prefetch_stats)
        self._inited = trio.Event()
        #: the mount as a migration source: volume, background copy, flush
        self.source = Source(self.pages, self.stats, opts.mountpoint, self._stack,
                             rate=opts.sync_rate, interval=opts.sync_interval,
                             paused=opts.sync_paused)
        #: a base page map waiting for its delta, and its open disks
        self.staged: tuple[PageMap, list[Disk]] | None = None
        self._nursery: trio.Nursery | None = None
        #: stopping (memfs umount, SIGTERM): the prefetch first, then FUSE
        self._prefetch_scope = trio.CancelScope()
        self._prefetch_stopped = trio.Event()
        self._main_scope = trio.CancelScope()
        self._stopping = False
        if opts.new:
            if not opts.regions or opts.pagemap is not None:
                raise MountError("--new needs regions (NAME:SIZE) and no page map")
            if not opts.volume:
                raise MountError("--new needs --volume: where the guest's pages are copied")
            opts.pagemap = PageMap(disks=[opts.volume], meta={"source": "mount"},
                                   regions=[Region.empty(n, s) for n, s in sizes.items()])

    def _prefetch_stats(self) -> dict[str, object]:
        p = self.prefetcher
        if p is None:
            return {"prefetch_done": 0}
        return {"prefetch_done": int(p.done.is_set()),
                "prefetch_seconds": round(p.finished_at, 3) if p.finished_at else 0}

    def _disk_stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.disks:
            for k, v in d.stats().items():
                out[k] = out.get(k, 0) + v
        return out

    async def install(self, pm: PageMap) -> None:
        """Open the page map's disks and hand the map to the page server."""
        await self._activate(pm, await self._prepare(pm))

    async def _prepare(self, pm: PageMap, have_disks: Sequence[Disk] = ()) -> list[Disk]:
        """Check ``pm`` against the mount and open its disks (beyond those
        already open for its first entries)."""
        have = {r.name: r.size for r in pm.regions}
        if have != self.pages.sizes:
            raise PageMapError(f"page map regions {have} do not match the mounted regions "
                               f"{self.pages.sizes}")
        if self.pages.installed.is_set():
            raise PageMapError("a page map is already installed")
        disks = list(have_disks)
        for uri in pm.disks[len(disks):]:
            disk = await open_disk(uri)
            self._stack.push_async_callback(disk.aclose)
            disks.append(disk)
        await check_volumes(pm, disks)  # a recreated volume: refused before any page
        return disks

    async def stage(self, pm: PageMap) -> None:
        """A base page map (memfs.handover): checked, disks open, not served
        until ``commit`` applies the delta."""
        if handover.BASE_KEY not in pm.meta:
            raise PageMapError("not a base page map (written by the control command 'base')")
        self.staged = (pm, await self._prepare(pm))
        log.info("staged base page map %s: %s", pm.meta[handover.BASE_KEY], pm.counts())

    async def commit(self, delta: PageMap) -> None:
        """Apply ``delta`` to the staged base and serve the result."""
        if self.staged is None:
            raise PageMapError("no staged page map: send 'stage PATH' first")
        pm, disks = self.staged
        n = handover.apply_delta(pm, delta)
        self.staged = None
        await self._activate(pm, await self._prepare(pm, disks))
        log.info("committed a delta of %d pages", n)

    async def _activate(self, pm: PageMap, disks: list[Disk]) -> None:
        self.disks = disks
        if self.state is not None:  # the map as installed; the journal goes on top
            await trio.to_thread.run_sync(self.state.installing, pm)
        self.pages.install(pm, Fetcher(disks, self.stats, retries=self.opts.fetch_retries))
        if self.state is not None:
            self.state.restore(self.pages)

    async def control(self, line: str) -> Callable[[], None] | None:
        """A command written to ``.memfs/control``; what it returns runs once
        the writer closes the file (stop: unmount after the reply)."""
        cmd, arg = parse_line(line)
        if cmd == "stop":
            force = arg == "force"
            found = await trio.to_thread.run_sync(self._mappers)
            if found and not force:
                raise ControlError(f"not unmounting {self.opts.mountpoint}: "
                                   f"{describe_mappers(found)} (stop it first, or --force)")
            nursery = self._nursery
            assert nursery is not None
            return lambda: nursery.start_soon(self.shutdown, "stop" + " force" * force)
        if cmd in ("save", "trace", "flush", "base", "delta"):
            async with self._write_target(arg) as target:
                await self._command(cmd, target)
        else:
            await self._command(cmd, arg)
        return None

    @asynccontextmanager
    async def _write_target(self, path: str) -> AsyncIterator[str]:
        """Where a control command may write ``path`` (control.writable_target),
        from a worker thread: the path may lead through this very mount."""
        allowed = self.opts.control_dirs or [
            os.path.dirname(p) for p in (self.pagemap_path, self.opts.trace_out,
                                         self.opts.store_dir and self.opts.store_dir + "/")
            if p]
        cm = writable_target(path, allowed, {0, os.getuid()},
                             private_ok=not self.opts.control_dirs)
        target = await trio.to_thread.run_sync(cm.__enter__)
        try:
            yield target
        finally:
            await trio.to_thread.run_sync(cm.__exit__, None, None, None)

    def _mappers(self) -> dict[int, tuple[str, set[str]]]:
        """Processes (other than this one) that map a region of this mount."""
        entry = find_mount(self.opts.mountpoint)
        return mappers(entry) if entry and entry.is_memfs else {}

    async def _command(self, cmd: str, arg: str) -> None:
        if cmd == "load":
            pm = await trio.to_thread.run_sync(PageMap.load, arg.strip())
            await self.install(pm)
            self.pagemap_path = arg.strip()
        elif cmd == "save":
            # the mount's view for an onward capture (PageServer.view)
            path = arg.strip()
            if not os.path.isabs(path):
                raise ValueError("save needs an absolute path")
            view = self.pages.view()
            view.meta["mountpoint"] = self.opts.mountpoint
            await trio.to_thread.run_sync(view.save, path)
        elif cmd == "stage":
            pm = await trio.to_thread.run_sync(PageMap.load, arg.strip())
            # the staged base is the migration's temporary file, gone when the
            # mount ends: the trace goes beside it only with --trace-out
            await self.stage(pm)
        elif cmd == "commit":
            delta = await trio.to_thread.run_sync(PageMap.load, arg.strip())
            await self.commit(delta)
        elif cmd in SOURCE_COMMANDS:
            assert self._nursery is not None
            await self.source.control(cmd, arg.strip(), self._nursery)
        elif cmd == "trace":
            path = arg.strip()
            if not os.path.isabs(path):
                raise ValueError("trace needs an absolute path")
            await trio.to_thread.run_sync(self.pages.trace.save, path)
        else:
            raise ValueError(f"unknown control command {cmd!r}")  # parse_line knows them

    def fuse_options(self) -> set[str]:
        o = set(pyfuse3.default_options)
        o |= {"fsname=memfs", "subtype=memfs"}
        if self.opts.allow_other:
            o.add("allow_other")
        if self.opts.debug_fuse:
            o.add("debug")
        if self.opts.max_read:
            o.add(f"max_read={self.opts.max_read}")
        return o

    async def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Mount, call ``ready``, serve until unmounted or signalled."""
        dump_stacks_on(signal.SIGUSR1)
        async with self._stack:
            self._stack.callback(self.store.close)
            if self.opts.new and self.opts.volume:
                await self.source.open_volume(self.opts.volume)  # create it: install reads it
            if self.opts.pagemap is not None:
                await self.install(self.opts.pagemap)
            if self.takeover is None:
                mp = os.path.realpath(self.opts.mountpoint)
                check_mountpoint(mp)
            else:  # a held connection (memfs.takeover), maybe with readers waiting
                mp = self.opts.mountpoint
            try:
                pyfuse3.init(self.fs, self.takeover.target if self.takeover else mp,
                             self.fuse_options())
            except RuntimeError as e:
                raise MountError(f"cannot mount {mp}: {e}") from None
            self._stack.callback(pyfuse3.close, True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope, name="signals")
                nursery.start_soon(self._after_init, mp, ready, name="after-init")
                await nursery.start(self.pages.run_background, name="deferred-store-writes")
                self._nursery = nursery
                if self.opts.volume:
                    nursery.start_soon(self.source.attach_volume, self.opts.volume, nursery,
                                       name="volume")
                nursery.start_soon(self._trim, name="trim")
                if self.opts.prefetch:
                    nursery.start_soon(self._prefetch_until_stopped, mp, name="prefetch")
                with self._main_scope:
                    await pyfuse3.main(min_tasks=4, max_tasks=64)
                # main returns once unmounted (fusermount -u) or terminated
                nursery.cancel_scope.cancel()
            if self.takeover is not None and self._stopping:
                detach(mp)  # libfuse unmounts nothing it did not mount
            log.info("unmounted %s; stats %s", mp, self.stats.counters)
            self._save_trace()

    def _save_trace(self) -> None:
        path = self.opts.trace_out or (self.pagemap_path + ".trace" if self.pagemap_path
                                       else None)
        if not path or not len(self.pages.trace):
            return
        try:
            self.pages.trace.save(path)
            log.info("working-set trace of %d pages written to %s", len(self.pages.trace), path)
        except OSError as e:
            log.warning("cannot write the working-set trace %s: %s", path, e.strerror)

    async def _prefetch(self, mp: str) -> None:
        trace = None
        if self.opts.prefetch_trace:
            trace = await trio.to_thread.run_sync(Trace.load, self.opts.prefetch_trace)
        await self._inited.wait()
        await self.pages.installed.wait()
        if self.opts.prefetch_delay and self.opts.prefetch_delay > 0:
            # the guests' first faults go first: wait for the first READ, then
            # for a pause of prefetch_delay seconds in the READs (10x at most);
            # polled (a loop turn every 50 ms, for 10 x delay at most) so that
            # the READ path signals nothing: it only counts
            delay, counters = self.opts.prefetch_delay, self.stats.counters
            while not counters["reads"]:
                await trio.sleep(0.05)
            first = quiet = trio.current_time()
            seen = counters["reads"]
            while min(quiet + delay, first + 10 * delay) > trio.current_time():
                await trio.sleep(min(0.05, delay / 4))
                if counters["reads"] != seen:
                    seen, quiet = counters["reads"], trio.current_time()
            log.info("prefetch: starting %.2fs after the first READ (%d READs)",
                     trio.current_time() - first, seen)
        assert self.pages.pagemap is not None
        trace = trace or Trace()
        hot = trace.extend_from_meta(self.pages.pagemap.meta)
        if hot:
            log.info("prefetch: %d pages changed between capture passes go first", hot)
        self.prefetcher = Prefetcher(self.pages, self.stats, mountpoint=mp, push=self.opts.push,
                                     rate=self.opts.prefetch_rate, trace=trace)
        await self.prefetcher.run()

    async def _trim(self) -> None:
        """Keep guest RAM once in host memory: the region's page cache holds
        it, so the store's and the disks' copies are dropped from the page
        cache (written back first) every second."""
        while True:
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(self.store.trim)
            sync = self.source.sync
            for disk in list(self.disks) + ([sync.volume] if sync else []):
                await disk.drop_cache()

    async def _after_init(self, mp: str, ready: Callable[[], None]) -> None:
        """Tune the bdi once the kernel's INIT is done (INIT resets read-ahead),
        then report readiness: a stat() returns only after INIT."""
        await trio.to_thread.run_sync(os.stat, mp)
        dev = mount_dev(mp)
        applied = tune_bdi(dev, self.opts) if dev else {}
        log.info("mounted %s (bdi %s) %s", mp, dev, applied)
        self._inited.set()
        ready()

    async def _signals(self, scope: trio.CancelScope) -> None:
        """SIGTERM, SIGHUP, SIGINT: what ``memfs umount`` does, refusals included:
        detaching a region that a process maps would SIGBUS it."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                name = signal.Signals(sig).name
                try:
                    found = await trio.to_thread.run_sync(self._mappers)
                except Exception as e:  # never unmount blind, never die of it
                    log.error("%s: not unmounting %s: cannot tell who maps it (%s)", name,
                              self.opts.mountpoint, e)
                    continue
                if found:
                    log.warning("%s: not unmounting %s: %s; still serving", name,
                                self.opts.mountpoint, describe_mappers(found))
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(self.shutdown, name)

    async def _prefetch_until_stopped(self, mp: str) -> None:
        with self._prefetch_scope:
            try:
                await self._prefetch(mp)
            finally:
                self._prefetch_stopped.set()

    async def shutdown(self, why: str, grace: float = 10.0) -> None:
        """Unmount: stop the prefetch (it holds region files open, which made a
        plain unmount EBUSY), end the FUSE loop, and let go of READs that wait
        for a page map that will not come now, or, after ``grace`` seconds,
        for a disk that does not answer.  run() then unmounts and cleans up."""
        if self._stopping:
            return
        self._stopping = True
        log.info("%s: stopping the prefetch and unmounting %s", why, self.opts.mountpoint)
        self._prefetch_scope.cancel()
        if self.opts.prefetch:
            await self._prefetch_stopped.wait()
        pyfuse3.terminate()
        if not self.pages.installed.is_set():
            self._main_scope.cancel()
            return
        await trio.sleep(grace)
        log.warning("%s: requests still in flight after %gs: cancelled", why, grace)
        self._main_scope.cancel()
