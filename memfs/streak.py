"""Streak push: a region read in order has the range ahead of it pushed.

Why: for an mmap sequential first touch the kernel sends one READ at a time
and the next only after the reply (issue 11: ~70 % of the time the daemon
held zero or one READ), so the serial FUSE round trips, not the disk, set
the pace.  When READs of a region arrive in order, the range just ahead of
them is read through the kernel (``prefetch.read_through``) in a worker
thread: the kernel asks this daemon, with ordinary READs (several in
flight), for exactly the pages it lacks, and the guest then finds them in
the page cache.  A page the kernel holds is never replaced, so DESIGN.md
invariant 3 holds by construction (notify_store is not allowed: see
memfs/prefetch.py); the pushed READs go through the normal READ path and
its single flight, so every page is fetched once.

``Streak`` is the pure detector (one per region); ``StreakPusher`` runs the
pushes.  A push's file is opened with POSIX_FADV_RANDOM: its read then asks
for exactly the pushed range (no read-ahead past it), so a READ that falls
in a push in flight is the push's own and teaches the detector nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import trio

from .pagemap import PageState, Region
from .prefetch import Populate, Residency, read_through
from .stats import Stats

log = logging.getLogger("memfs.streak")

#: a streak pushes once it spans more than this: four 1 MiB READs and then
#: elsewhere is one huge-page fault (the kernel reads 4 MiB around it), not
#: a sequential touch
TRIGGER = 4 << 20
#: pushes start this far past the streak's end (the kernel's own next
#: read-ahead goes there: two readers allocating the same pages split each
#: other's READs into pieces of a few KiB), reach WINDOW further, DEPTH at a time
LEAD = 1 << 20
#: Off (0) unless MEMFS_STREAK_WINDOW (bytes) says otherwise: measured on
#: the two-core bench host, no window (4, 8, 16 MiB) made a sequential first
#: touch faster; the daemon's loop, 70-90 % busy on the READs alone, is the
#: limit there, not the round trips, and a push adds work to it (the
#: report of issue 11's streak push has the figures)
WINDOW = int(os.environ.get("MEMFS_STREAK_WINDOW", "0"))
DEPTH = 2
#: a READ this far past the streak's end (zero pages are not read by the
#: kernel twice; a guest's read-ahead READ may skip a little) still continues
#: it; a READ this far before it is a late one of the same streak
GAP = 256 << 10
#: seconds without a push after which a region's push file is closed (an open
#: file keeps the mount busy for fusermount -u)
IDLE = 0.2


class Streak:
    """In-order READs of one region, in pages; says what to push next.

    ``read`` takes every READ; ``done`` each push it returned, once over.
    """

    def __init__(self, npages: int, page_size: int = 4096, *, trigger: int = TRIGGER,
                 window: int = WINDOW, depth: int = DEPTH, gap: int = GAP,
                 lead: int = LEAD) -> None:
        self.npages = npages
        self.trigger = max(1, trigger // page_size)
        self.window = max(1, window // page_size)
        self.depth = depth
        self.chunk = max(1, self.window // max(1, depth))
        self.gap = gap // page_size
        self.lead = lead // page_size
        #: pushes start on READ boundaries (1 MiB): the guest's READs and the
        #: push's then meet whole, not in pieces
        self.align = max(1, (1 << 20) // page_size)
        self.start = self.end = -1  # the streak: pages [start, end) read in order
        self.ahead = -1  # pushed (or passed over) up to here
        self.pushing: list[tuple[int, int]] = []

    def read(self, first: int, end: int) -> tuple[int, int] | None:
        """A READ of pages [first, end): the range to push now, if any."""
        for lo, hi in self.pushing:
            if lo <= first and end <= hi:
                return None  # the push's own READ
        tip = max(self.end, self.ahead)
        if self.end >= 0 and self.end - self.window - self.gap <= first <= tip + self.gap:
            self.end = max(self.end, end)
        else:  # elsewhere: a new streak starts here
            self.start, self.end, self.ahead = first, end, -1
        if self.end - self.start <= self.trigger or len(self.pushing) >= self.depth:
            return None
        lo = max(-(-(self.end + self.lead) // self.align) * self.align, self.ahead)
        hi = min(lo + self.chunk, self.end + self.lead + self.window, self.npages)
        if hi <= lo:
            return None
        self.ahead = hi
        self.pushing.append((lo, hi))
        return lo, hi

    def done(self, lo: int, hi: int) -> None:
        """The push of [lo, hi) is over (pushed, failed or not needed)."""
        try:
            self.pushing.remove((lo, hi))
        except ValueError:
            pass


def worth_pushing(region: Region, lo: int, hi: int) -> bool:
    """Only a range with a remote page: zero pages cost no fetch, and a local
    page is no round trip to the disk either."""
    return region.states.find(PageState.REMOTE, lo, hi) >= 0


def _open_for_push(path: str) -> Residency:
    """The region file, read exactly where a push asks (no read-ahead past it)."""
    res = Residency(path)
    try:
        os.posix_fadvise(res.fd, 0, 0, os.POSIX_FADV_RANDOM)
    except OSError:
        res.close()
        raise
    return res


class StreakPusher:
    """Pushes ahead of streaks; ``observe`` is the READ path's hook.
    ``residency`` and ``populate`` reach the kernel; tests pass their own."""

    def __init__(self, stats: Stats, *, window: int = WINDOW, depth: int = DEPTH,
                 residency: Callable[[str], Residency] = _open_for_push,
                 populate: Populate = read_through) -> None:
        self.stats = stats
        self.window = window
        self.depth = depth
        self.residency = residency
        self.populate = populate
        self.mountpoint: str | None = None
        self._streaks: dict[str, Streak] = {}
        self._files: dict[str, Residency] = {}
        self._opening: dict[str, trio.Event] = {}
        self._last: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        for name in ("pages_streak_pushed", "streak_pushes"):
            stats.counters.setdefault(name, 0)

    async def run(self, mountpoint: str,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve pushes until ``stop``; every push file is closed after."""
        self.mountpoint = mountpoint
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await self._close_idle()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for name in list(self._files):
                    await self._close(name)
            self._stopped.set()

    async def stop(self) -> None:
        """Cancel the pushes and close their files (before unmounting)."""
        self._scope.cancel()
        if self.mountpoint is not None:
            await self._stopped.wait()

    def observe(self, region: Region, first: int, end: int) -> None:
        """A READ of pages [first, end) of ``region`` arrived."""
        if self._nursery is None:
            return
        streak = self._streaks.get(region.name)
        if streak is None:
            streak = self._streaks[region.name] = Streak(
                region.npages, region.page_size, window=self.window, depth=self.depth)
        rng = streak.read(first, end)
        if rng is None:
            return
        if not worth_pushing(region, *rng):
            streak.done(*rng)
            return
        self._nursery.start_soon(self._push, region, streak, *rng)

    async def _push(self, region: Region, streak: Streak, lo: int, hi: int) -> None:
        ps = region.page_size
        try:
            res = await self._file(region.name)
            n = await trio.to_thread.run_sync(self.populate, res, lo * ps, (hi - lo) * ps)
            self.stats.add("pages_streak_pushed", n)
            self.stats.add("streak_pushes")
        except OSError as e:  # a READ failed: the guest's own READ asks again
            self.stats.add("push_errors")
            log.warning("streak push of %s pages %d..%d failed: %s", region.name, lo, hi - 1, e)
        finally:
            streak.done(lo, hi)
            self._last[region.name] = trio.current_time()

    async def _file(self, name: str) -> Residency:
        """The region's push file, opened once (in a worker thread: the open
        is a request to this very daemon)."""
        while name not in self._files:
            ev = self._opening.get(name)
            if ev is not None:
                await ev.wait()
                continue
            ev = self._opening[name] = trio.Event()
            try:
                path = os.path.join(self.mountpoint or "", name)
                self._files[name] = await trio.to_thread.run_sync(self.residency, path)
            finally:
                del self._opening[name]
                ev.set()
        return self._files[name]

    async def _close_idle(self) -> None:
        while True:
            await trio.sleep(IDLE / 2)
            now = trio.current_time()
            for name in list(self._files):
                s = self._streaks.get(name)
                if (s is None or not s.pushing) and now - self._last.get(name, 0) > IDLE:
                    await self._close(name)

    async def _close(self, name: str) -> None:
        res = self._files.pop(name, None)
        if res is not None:  # close() sends FLUSH to this daemon: not on the loop
            await trio.to_thread.run_sync(res.close)
