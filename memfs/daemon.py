"""The mount's lifecycle: open disks, mount, serve, unmount, release.

Everything acquired goes on one AsyncExitStack so that an error at any step
(a dead NBD server, a busy mount point) releases what was taken before it.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Callable

import pyfuse3
import trio

from .disks import Disk, open_disk
from .fetcher import Fetcher
from .fs import MemFS
from .pagemap import PageMap, PageMapError
from .pages import PageServer
from .prefetch import Prefetcher
from .trace import Trace
from .stats import Stats
from .store import LocalStore

log = logging.getLogger("memfs.daemon")


@dataclass
class MountOptions:
    mountpoint: str
    pagemap: PageMap | None = None
    #: region name -> size, for a mount that waits for its page map
    regions: dict[str, int] = field(default_factory=dict)
    store_dir: str | None = None
    allow_other: bool = False
    debug_fuse: bool = False
    read_ahead_kb: int | None = None
    max_read: int | None = None
    fetch_retries: int = 3
    mode: int = 0o600
    bdi_max_ratio: int | None = None
    bdi_strict_limit: int | None = None
    #: background completion (issue: prefetch into the page cache)
    prefetch: bool = True
    push: bool = True
    prefetch_rate: float | None = None
    prefetch_trace: str | None = None
    #: where the working-set trace goes at unmount (None: beside the page map)
    trace_out: str | None = None
    pagemap_path: str | None = None


class MountError(Exception):
    """The mount could not be set up; the message says why."""


def check_mountpoint(path: str) -> None:
    """The mount point must be an existing, empty directory."""
    if not os.path.exists(path):
        raise MountError(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"mount point {path} is already a mount point")
    if os.listdir(path):
        raise MountError(f"mount point {path} is not empty")


def mount_dev(real: str) -> str | None:
    """MAJ:MIN of the filesystem mounted at the resolved path ``real``, from
    mountinfo: any stat() of the mount from the daemon itself (realpath
    included) would deadlock before the loop runs."""
    real = real.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011") \
        .replace("\n", "\\012")
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == real:
                dev = parts[2]  # the last one is on top
    return dev


def tune_bdi(dev: str, opts: MountOptions) -> dict[str, int]:
    """Apply read-ahead and write-back limits to the mount's bdi."""
    applied: dict[str, int] = {}
    for key, value in (("read_ahead_kb", opts.read_ahead_kb),
                       ("max_ratio", opts.bdi_max_ratio),
                       ("strict_limit", opts.bdi_strict_limit)):
        if value is None:
            continue
        path = f"/sys/class/bdi/{dev}/{key}"
        try:
            with open(path, "w") as f:
                f.write(f"{value}\n")
            applied[key] = value
        except OSError as e:
            log.warning("cannot set %s=%s: %s", path, value, e.strerror)
    return applied


class Daemon:
    def __init__(self, opts: MountOptions) -> None:
        self.opts = opts
        self.stats = Stats()
        self.disks: list[Disk] = []
        sizes = ({r.name: r.size for r in opts.pagemap.regions} if opts.pagemap
                 else dict(opts.regions))
        if not sizes:
            raise MountError("nothing to serve: no page map and no --region")
        self.store = LocalStore(opts.store_dir)
        self.pages = PageServer(sizes, self.store, self.stats)
        self.stats.gauges.append(self._disk_stats)
        self.fs = MemFS(self.pages, self.stats, self.control, mode=opts.mode)
        self._stack = AsyncExitStack()
        self.pagemap_path = opts.pagemap_path
        self.prefetcher: Prefetcher | None = None
        self.stats.gauges.append(self._prefetch_stats)
        self._inited = trio.Event()

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
        have = {r.name: r.size for r in pm.regions}
        if have != self.pages.sizes:
            raise PageMapError(f"page map regions {have} do not match the mounted regions "
                               f"{self.pages.sizes}")
        disks = []
        for uri in pm.disks:
            disk = await open_disk(uri)
            self._stack.push_async_callback(disk.aclose)
            disks.append(disk)
        self.disks = disks
        self.pages.install(pm, Fetcher(disks, self.stats, retries=self.opts.fetch_retries))

    async def control(self, line: str) -> None:
        """A command written to ``.memfs/control``."""
        cmd, _, arg = line.partition(" ")
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
        elif cmd == "trace":
            path = arg.strip()
            if not os.path.isabs(path):
                raise ValueError("trace needs an absolute path")
            await trio.to_thread.run_sync(self.pages.trace.save, path)
        else:
            raise ValueError(f"unknown control command {cmd!r} "
                             "(known: load PATH, save PATH, trace PATH)")

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
        async with self._stack:
            self._stack.callback(self.store.close)
            if self.opts.pagemap is not None:
                await self.install(self.opts.pagemap)
            mp = os.path.realpath(self.opts.mountpoint)
            check_mountpoint(mp)
            try:
                pyfuse3.init(self.fs, mp, self.fuse_options())
            except RuntimeError as e:
                raise MountError(f"cannot mount {mp}: {e}") from None
            self._stack.callback(pyfuse3.close, True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope, name="signals")
                nursery.start_soon(self._after_init, mp, ready, name="after-init")
                self.pages.background = nursery
                if self.opts.prefetch:
                    nursery.start_soon(self._prefetch, mp, name="prefetch")
                await pyfuse3.main(min_tasks=4, max_tasks=64)
                # main returns once unmounted (fusermount -u) or terminated
                nursery.cancel_scope.cancel()
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
        assert self.pages.pagemap is not None
        trace = trace or Trace()
        hot = trace.extend_from_meta(self.pages.pagemap.meta)
        if hot:
            log.info("prefetch: %d pages changed between capture passes go first", hot)
        self.prefetcher = Prefetcher(
            self.pages, self.stats, mountpoint=mp, inode_of=self.fs.region_inode.__getitem__,
            push=self.opts.push, rate=self.opts.prefetch_rate, trace=trace)
        await self.prefetcher.run()

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
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log.info("signal %d: unmounting", sig)
                pyfuse3.terminate()
