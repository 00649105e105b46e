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

The policy is here; what it uses has a module each: ``fetch_plan`` (pages
into disk requests), ``fetch_flight`` (who reads which page now, held
bytes) and ``fetch_slots`` (bounded reads, demand before prefetch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import trio

from ._fast import has_xxh3, verify
from .disks import Disk, DiskError
from .fetch_flight import Flight, Flights
from .fetch_plan import Run, coalesce, ranges as _ranges, remote_pages
from .fetch_slots import Slots
from .pagemap import Region, checksum
from .stats import Stats

__all__ = ["DEFAULT_DEADLINE", "FAIL_WINDOW", "FetchError", "Fetcher", "Run", "coalesce",
           "remote_pages"]

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


#: seconds a fetch may take, retries included, from a disk without a timeout
DEFAULT_DEADLINE = math.inf
#: seconds pages that failed a demand fetch keep failing at once
FAIL_WINDOW = 2.0


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
        self._slots = Slots(slots)
        self._failures: list[_Failure] = []
        self._flights = Flights()
        #: region -> page -> fetched bytes whose store write has not landed
        self._held = self._flights.held
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
        self._flights.settled(region.name, pages)

    def in_flight(self, region: Region) -> int:
        """Pages of ``region`` being fetched now (tests, stats)."""
        return self._flights.in_flight(region.name)

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
        good, mine, joined = self._flights.sort(region.name, pages)
        if good:
            self.stats.add("pages_held_hits", len(good))
        if not prefetch and any(not f.urgent for f in joined):
            # a demand READ waits for a prefetch: it must not wait behind
            # every other demand READ as the prefetch would
            for f in joined:
                f.urgent = True
            await self._slots.wake_parked()
        own_err = await self._fly(region, mine, prefetch, good, own) if mine else None
        failed, reason = await self._join(region, joined, prefetch, good)
        if own_err is not None or failed:
            if own_err is not None:
                failed.extend(own_err.pages)
                reason = own_err.reason
            raise FetchError(region.name, sorted(failed), reason, good)
        return good

    async def _fly(self, region: Region, mine: list[int], prefetch: bool,
                   good: dict[int, memoryview], own: set[int] | None) -> FetchError | None:
        """Read ``mine`` in a new flight into ``good`` (and ``own``); the
        error of the pages that failed, if any (the rest are in ``good``)."""
        flight = self._flights.start(region.name, mine, prefetch)
        err: FetchError | None = None
        try:
            try:
                got = await self._fetch_own(region, mine, prefetch=prefetch, flight=flight)
            except FetchError as e:
                got, err = e.partial, e
                flight.reason = e.reason
            self._flights.land(region.name, flight, got)
            if own is not None:
                own.update(got)
            good.update(got)
        finally:
            self._flights.end(region.name, mine, flight)
        return err

    async def _join(self, region: Region, joined: dict[Flight, list[int]], prefetch: bool,
                    good: dict[int, memoryview]) -> tuple[list[int], str]:
        """Wait for the flights others have in flight; their pages go into
        ``good``.  A cancelled flight's pages, and a failed prefetch's pages
        a demand fetch wants, are asked for again.  Returns the pages that
        failed, and why."""
        failed: list[int] = []
        reason = ""
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
        return failed, reason

    async def _fetch_own(self, region: Region, pages: Sequence[int], *,
                         prefetch: bool = False,
                         flight: Flight | None = None) -> dict[int, memoryview]:
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
                    flight: Flight | None = None) -> bytes:
        """The bytes of ``run``; DiskError if they are not there by ``deadline``.

        The wait for a slot counts against the deadline; the disk enforces
        it on the read itself (a file disk's pread cannot be abandoned).
        """
        disk = self.disks[run.disk]
        got_slot = self._slots.try_acquire(prefetch)  # the usual case: no cancel scope, no wait
        if not got_slot:
            with trio.move_on_at(deadline):
                await self._slots.acquire(prefetch, flight)
                got_slot = True
        if not got_slot:
            raise DiskError(f"{disk.uri}: read of {run.length} bytes at {run.offset} found "
                            "no free slot before its deadline")
        try:
            return await disk.read(run.offset, run.length,
                                   deadline=None if math.isinf(deadline) else deadline)
        finally:
            self._slots.release()

    async def _fetch_run(self, region: Region, run: Run, prefetch: bool,
                         good: dict[int, memoryview],
                         flight: Flight | None = None) -> tuple[list[int], str]:
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
                bad = _verify(memoryview(data), ps, sums, r.pages, good)
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


def _check(view: memoryview, ps: int, sums: Sequence[int], pages: Sequence[tuple[int, int]],
           good: dict[int, memoryview]) -> list[int]:
    """``_fast.verify`` page by page: pages that match go into ``good``
    (views of ``view``), the others are returned."""
    bad = []
    for p, pos in pages:
        page = view[pos:pos + ps]
        if checksum(page) == sums[p]:
            good[p] = page
        else:
            bad.append(p)
    return bad


#: a run's pages checked in one C call (xxh3 from the system's libxxhash,
#: without the GIL), or in Python where that library is missing
_verify = verify if has_xxh3() else _check
