"""The fetcher: turns "these remote pages, now" into verified disk reads.

Neighbouring pages whose locations are neighbours too are read with one
request; every page is checked against its xxh3 before anyone sees it; a read
that fails or does not verify is retried (the disk back end reconnects on its
own), and only then reported.  Demand reads go first: prefetch requests wait
while a demand request is waiting for a slot.

A fetch has one deadline, the disk's ``timeout`` (NBD ``?timeout=S``): the
wait for a slot, the disk's own resends and reconnects and the retries here
all share it, so a server that stops answering fails a READ after about
``timeout`` seconds, not ``retries x timeout``.  Pages that just failed a
demand fetch are remembered for ``fail_window`` seconds and a fetch that asks
for them again fails at once: after a failed read-ahead the kernel asks again
for the faulting page, synchronously, and that second READ must not wait a
whole second deadline for an answer the first one just did not get.

Single flight: a page is read from the disk by one fetch at a time.  A fetch
that wants a page another fetch has in flight (a READ, the kernel's
read-ahead, the prefetcher) waits for that one and takes its bytes; a page
fetched whose store write has not landed yet (``held`` until the page server
calls ``settled``) is answered from the fetched bytes.  A demand fetch that
joined a prefetch which failed or was cancelled asks the disk itself: the
prefetch's failure is not its answer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import trio

from .disks import Disk, DiskError
from .pagemap import PageState, Region, checksum
from .stats import Stats

log = logging.getLogger("memfs.fetcher")


class FetchError(Exception):
    """Some pages could not be read and verified; ``pages`` lists them."""

    def __init__(self, region: str, pages: list[int], reason: str,
                 partial: dict[int, memoryview] | None = None) -> None:
        super().__init__(f"region {region}: {len(pages)} page(s) failed, first {pages[0]}: {reason}")
        self.region = region
        self.pages = pages
        self.reason = reason
        #: the pages that did verify: a caller may keep them
        self.partial: dict[int, memoryview] = partial if partial is not None else {}


@dataclass(frozen=True)
class Run:
    """One disk request: ``length`` bytes at ``offset`` holding ``pages``.

    ``pages`` are (page index, byte position in the request).  Small gaps
    between them are read and thrown away: one round trip is dearer than a
    few KiB of bandwidth (the identity layout leaves zero pages as gaps).
    """

    disk: int
    offset: int
    length: int
    pages: tuple[tuple[int, int], ...]

    @property
    def first(self) -> int:
        return self.pages[0][0]


def coalesce(region: Region, pages: Iterable[int], max_bytes: int,
             max_gap: int = 0) -> list[Run]:
    """Group remote ``pages`` (ascending) into disk requests of at most
    ``max_bytes``, bridging gaps of up to ``max_gap`` bytes on the disk."""
    ps = region.page_size
    disks, offsets = region.disks, region.offsets
    runs: list[Run] = []
    cur: list[tuple[int, int]] = []
    disk = start = end = -1
    for p in pages:
        d, off = disks[p], offsets[p]
        if cur and d == disk and end <= off <= end + max_gap and off + ps - start <= max_bytes:
            cur.append((p, off - start))
            end = off + ps
            continue
        if cur:
            runs.append(Run(disk, start, end - start, tuple(cur)))
        disk, start, end = d, off, off + ps
        cur = [(p, 0)]
    if cur:
        runs.append(Run(disk, start, end - start, tuple(cur)))
    return runs


def remote_pages(region: Region, first: int, count: int) -> list[int]:
    """Indexes of the pages in [first, first+count) whose source bit is set."""
    states = region.states
    remote = PageState.REMOTE
    return [p for p in range(first, first + count) if states[p] == remote]


#: seconds a fetch may take, retries included, from a disk without a timeout
DEFAULT_DEADLINE = math.inf
#: seconds pages that failed a demand fetch keep failing at once
FAIL_WINDOW = 2.0


class _Flight:
    """Pages one fetch is reading; the others that want them wait on ``done``."""

    __slots__ = ("prefetch", "urgent", "done", "got", "reason", "finished")

    def __init__(self, prefetch: bool) -> None:
        self.prefetch = prefetch
        #: a demand fetch waits for it: its reads go at demand priority
        self.urgent = not prefetch
        self.done = trio.Event()
        self.got: dict[int, memoryview] = {}
        self.reason = "cancelled"
        self.finished = False  # False at ``done``: cancelled, ask again


@dataclass
class _Failure:
    """Pages of one region that failed a demand fetch, until ``until``."""

    region: str
    pages: frozenset[int]
    until: float
    reason: str


class Fetcher:
    def __init__(self, disks: Sequence[Disk], stats: Stats, *, retries: int = 3,
                 max_request: int = 4 << 20, slots: int = 16,
                 retry_delay: float = 0.05, max_gap: int = 64 << 10,
                 deadline: float | None = None, fail_window: float = FAIL_WINDOW) -> None:
        """``deadline`` (seconds) overrides every disk's own ``timeout``."""
        self.disks = list(disks)
        self.stats = stats
        self.retries = retries
        self.max_request = max_request
        self.retry_delay = retry_delay
        self.max_gap = max_gap
        self.deadline = deadline
        self.fail_window = fail_window
        self._slots = trio.CapacityLimiter(slots)
        self._demand_waiting = 0
        self._demand_idle = trio.Condition()
        self._parked = 0  # prefetch reads waiting on _demand_idle
        self._failures: list[_Failure] = []
        #: region -> page -> the fetch reading it now
        self._flights: dict[str, dict[int, _Flight]] = {}
        #: region -> page -> fetched bytes whose store write has not landed
        self._held: dict[str, dict[int, memoryview]] = {}
        for name in ("reads_failed_fast", "pages_fetched_demand", "pages_fetched_prefetch",
                     "bytes_bridged", "pages_joined", "pages_held_hits"):
            stats.counters.setdefault(name, 0)

    def _timeout(self, disk: int) -> float:
        if self.deadline is not None:
            return self.deadline
        t = self.disks[disk].timeout
        return DEFAULT_DEADLINE if t is None else t

    def _recent_failure(self, region: Region, pages: Sequence[int]) -> tuple[list[int], str]:
        """Pages among ``pages`` that failed a demand fetch moments ago."""
        now = trio.current_time()
        self._failures = [f for f in self._failures if f.until > now]
        for f in self._failures:
            if f.region == region.name:
                hit = f.pages.intersection(pages)
                if hit:
                    return sorted(hit), f.reason
        return [], ""

    def settled(self, region: Region, pages: Iterable[int]) -> None:
        """The page server is done with these fetched pages (kept in the
        store, or not): from now on the page state says where they are."""
        held = self._held.get(region.name)
        if held:
            for p in pages:
                held.pop(p, None)

    def in_flight(self, region: Region) -> int:
        """Pages of ``region`` being fetched now (tests, stats)."""
        return len(self._flights.get(region.name, ()))

    async def fetch(self, region: Region, pages: Sequence[int], *,
                    prefetch: bool = False,
                    own: set[int] | None = None) -> dict[int, memoryview]:
        """Read and verify ``pages``: page index -> its verified bytes.

        Pages in flight in another fetch are waited for, not read again;
        pages fetched but not yet settled are answered from their bytes.
        Errors as ``_fetch_own``; the pages a joined fetch failed are failed
        here too (with its reason), unless it was a prefetch or cancelled.
        ``own`` receives the pages this call read from the disk itself.
        """
        name = region.name
        flights = self._flights.setdefault(name, {})
        held = self._held.setdefault(name, {})
        good: dict[int, memoryview] = {}
        mine: list[int] = []
        joined: dict[_Flight, list[int]] = {}
        for p in pages:
            data = held.get(p)
            if data is not None:
                good[p] = data
                continue
            f = flights.get(p)
            if f is None:
                mine.append(p)
            else:
                joined.setdefault(f, []).append(p)
        if good:
            self.stats.add("pages_held_hits", len(good))
        if not prefetch and any(not f.urgent for f in joined):
            # a demand READ waits for a prefetch: it must not wait behind
            # every other demand READ as the prefetch would
            for f in joined:
                f.urgent = True
            async with self._demand_idle:
                self._demand_idle.notify_all()
        failed: list[int] = []
        reason = ""
        partial_err: FetchError | None = None
        if mine:
            flight = _Flight(prefetch)
            for p in mine:
                flights[p] = flight
            try:
                try:
                    got = await self._fetch_own(region, mine, prefetch=prefetch, flight=flight)
                except FetchError as e:
                    got = e.partial
                    partial_err = e
                    flight.reason = e.reason
                flight.got = got
                flight.finished = True
                if own is not None:
                    own.update(got)
                good.update(got)
                held.update(got)
            finally:
                for p in mine:
                    if flights.get(p) is flight:
                        del flights[p]
                flight.done.set()
        for f, ps in joined.items():
            self.stats.add("pages_joined", len(ps))
            await f.done.wait()
            again: list[int] = []
            for p in ps:
                data = f.got.get(p)
                if data is not None:
                    good[p] = data
                elif not f.finished or (f.prefetch and not prefetch):
                    again.append(p)
                else:
                    failed.append(p)
                    reason = reason or f.reason
            if again:
                try:
                    good.update(await self.fetch(region, again, prefetch=prefetch))
                except FetchError as e:
                    good.update(e.partial)
                    failed.extend(e.pages)
                    reason = reason or e.reason
        if partial_err is not None or failed:
            if partial_err is not None:
                failed.extend(partial_err.pages)
                reason = partial_err.reason
            raise FetchError(name, sorted(failed), reason, good)
        return good

    async def _fetch_own(self, region: Region, pages: Sequence[int], *,
                         prefetch: bool = False,
                         flight: _Flight | None = None) -> dict[int, memoryview]:
        """Read and verify ``pages`` from the disk.

        All or nothing: raises FetchError naming the pages that failed after
        every retry; the verified ones ride along in ``FetchError.partial``
        so that a caller may keep them.
        """
        if self._failures:
            recent, why = self._recent_failure(region, pages)
            if recent:
                partial: dict[int, memoryview] = {}
                if prefetch:  # the others are still worth having
                    rest = sorted(set(pages).difference(recent))
                    try:
                        partial = await self._fetch_own(region, rest, prefetch=True) \
                            if rest else {}
                    except FetchError as e:
                        partial = e.partial
                else:
                    self.stats.add("reads_failed_fast")
                    log.warning("region %s pages %s failed less than %g s ago; failed again "
                                "without asking the disk", region.name, _ranges(recent),
                                self.fail_window)
                raise FetchError(region.name, recent, f"failed moments ago, not asked again "
                                 f"for {self.fail_window:g} s: {why}", partial)
        runs = coalesce(region, pages, self._run_bytes(region), self.max_gap)
        good: dict[int, memoryview] = {}
        failed: list[int] = []
        reasons: list[str] = []

        async def one(run: Run) -> None:
            bad, reason = await self._fetch_run(region, run, prefetch, good, flight)
            if bad:
                failed.extend(bad)
                reasons.append(reason)

        if len(runs) == 1:
            await one(runs[0])
        else:
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(one, run)
        if failed:
            if not prefetch and self.fail_window > 0:
                self._failures.append(_Failure(region.name, frozenset(failed),
                                               trio.current_time() + self.fail_window,
                                               reasons[0]))
            raise FetchError(region.name, sorted(failed), reasons[0], good)
        return good

    def _run_bytes(self, region: Region) -> int:
        limit = self.max_request
        for d in self.disks:
            limit = min(limit, d.max_request)
        return max(limit, region.page_size)

    async def _read(self, run: Run, prefetch: bool, deadline: float,
                    flight: _Flight | None = None) -> bytes:
        """The bytes of ``run``; DiskError if they are not there by ``deadline``.

        The wait for a slot counts against the deadline; the disk enforces
        it on the read itself (a file disk's pread cannot be abandoned).
        """
        disk = self.disks[run.disk]
        got_slot = self._try_acquire(prefetch)  # the usual case: no cancel scope, no wait
        if not got_slot:
            with trio.move_on_at(deadline):
                await self._acquire(prefetch, flight)
                got_slot = True
        if not got_slot:
            raise DiskError(f"{disk.uri}: read of {run.length} bytes at {run.offset} found "
                            "no free slot before its deadline")
        try:
            return await disk.read(run.offset, run.length,
                                   deadline=None if math.isinf(deadline) else deadline)
        finally:
            self._slots.release()

    def _try_acquire(self, prefetch: bool) -> bool:
        """A free slot at once (none is waited for), if priority allows."""
        if prefetch and self._demand_waiting:
            return False
        try:
            self._slots.acquire_nowait()  # fair: fails while anyone waits
        except trio.WouldBlock:
            return False
        return True

    async def _acquire(self, prefetch: bool, flight: _Flight | None = None) -> None:
        """A slot; demand reads first (and a prefetch a demand read waits for)."""
        if prefetch:
            async with self._demand_idle:
                self._parked += 1
                try:
                    while self._demand_waiting and not (flight is not None and flight.urgent):
                        await self._demand_idle.wait()
                finally:
                    self._parked -= 1
            await self._slots.acquire()
            return
        self._demand_waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._demand_waiting -= 1
            if not self._demand_waiting and self._parked:
                with trio.CancelScope(shield=True):  # a cancelled demand still wakes them
                    async with self._demand_idle:
                        self._demand_idle.notify_all()

    async def _fetch_run(self, region: Region, run: Run, prefetch: bool,
                         good: dict[int, memoryview],
                         flight: _Flight | None = None) -> tuple[list[int], str]:
        """Fetch one run into ``good``; return the pages that never verified."""
        ps = region.page_size
        sums = region.checksums
        todo = [run]
        reason = ""
        timeout = self._timeout(run.disk)
        deadline = trio.current_time() + timeout
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.retry_delay * (2 ** (attempt - 1))
                if trio.current_time() + delay >= deadline:
                    reason = f"{reason}; no time left for a retry within {timeout:g} s"
                    break
                self.stats.add("fetch_retries")
                await trio.sleep(delay)
            attempts += 1
            retry: list[int] = []
            for r in todo:
                self.stats.add("fetch_requests")
                try:
                    data = await self._read(r, prefetch, deadline, flight)
                except DiskError as e:
                    self.stats.add("fetch_errors")
                    reason = str(e)
                    log.warning("fetch of %s pages %s failed (attempt %d): %s", region.name,
                                _ranges([p for p, _ in r.pages]), attempt + 1, e)
                    retry.extend(p for p, _ in r.pages)
                    continue
                self.stats.add("bytes_fetched", len(data))
                view = memoryview(data)
                bad = []
                for p, pos in r.pages:
                    page = view[pos:pos + ps]
                    if checksum(page) == sums[p]:
                        good[p] = page
                    else:
                        bad.append(p)
                ok = len(r.pages) - len(bad)
                self.stats.add("pages_fetched", ok)
                self.stats.add("pages_fetched_prefetch" if prefetch else "pages_fetched_demand", ok)
                self.stats.add("bytes_bridged", len(data) - len(r.pages) * ps)
                if bad:
                    reason = "checksum mismatch"
                    self.stats.add("checksum_failures", len(bad))
                    log.error("CHECKSUM MISMATCH in region %s pages %s (disk %d, attempt %d)",
                              region.name, _ranges(bad), r.disk, attempt + 1)
                    retry.extend(bad)
            if not retry:
                return [], reason
            todo = coalesce(region, retry, self._run_bytes(region), self.max_gap)
        log.error("GIVING UP on region %s pages %s after %d attempt(s): %s",
                  region.name, _ranges(sorted(retry)), attempts, reason)
        self.stats.add("pages_failed", len(retry))
        return retry, reason


def _ranges(pages: list[int]) -> str:
    """Compact "1-4,9" form for log lines."""
    out: list[str] = []
    start = prev = None
    for p in pages:
        if start is None:
            start = prev = p
        elif p == prev + 1:  # type: ignore[operator]
            prev = p
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = p
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out[:20]) + (",…" if len(out) > 20 else "")
