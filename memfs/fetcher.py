"""The fetcher: turns "these remote pages, now" into verified disk reads.

Neighbouring pages whose locations are neighbours too are read with one
request; every page is checked against its xxh3 before anyone sees it; a read
that fails or does not verify is retried (the disk back end reconnects on its
own), and only then reported.  Demand reads go first: prefetch requests wait
while a demand request is waiting for a slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import trio

from .disks import Disk, DiskError
from .pagemap import PageState, Region, checksum
from .stats import Stats

log = logging.getLogger("memfs.fetcher")


class FetchError(Exception):
    """Some pages could not be read and verified; ``pages`` lists them."""

    def __init__(self, region: str, pages: list[int], reason: str) -> None:
        super().__init__(f"region {region}: {len(pages)} page(s) failed, first {pages[0]}: {reason}")
        self.region = region
        self.pages = pages
        self.reason = reason


@dataclass(frozen=True)
class Run:
    """Consecutive pages whose contents are consecutive on one disk."""

    first: int      # first page index in the region
    count: int
    disk: int
    offset: int     # byte offset of the first page on the disk


def coalesce(region: Region, pages: Iterable[int], max_bytes: int) -> list[Run]:
    """Group remote ``pages`` (ascending) into runs of at most ``max_bytes``."""
    ps = region.page_size
    max_pages = max(1, max_bytes // ps)
    disks, offsets = region.disks, region.offsets
    runs: list[Run] = []
    first = count = disk = offset = -1
    for p in pages:
        d, off = disks[p], offsets[p]
        if p == first + count and d == disk and off == offset + count * ps and count < max_pages:
            count += 1
            continue
        if count > 0:
            runs.append(Run(first, count, disk, offset))
        first, count, disk, offset = p, 1, d, off
    if count > 0:
        runs.append(Run(first, count, disk, offset))
    return runs


def remote_pages(region: Region, first: int, count: int) -> list[int]:
    """Indexes of the pages in [first, first+count) whose source bit is set."""
    states = region.states
    remote = PageState.REMOTE
    return [p for p in range(first, first + count) if states[p] == remote]


class Fetcher:
    def __init__(self, disks: Sequence[Disk], stats: Stats, *, retries: int = 3,
                 max_request: int = 4 << 20, slots: int = 16,
                 retry_delay: float = 0.05) -> None:
        self.disks = list(disks)
        self.stats = stats
        self.retries = retries
        self.max_request = max_request
        self.retry_delay = retry_delay
        self._slots = trio.CapacityLimiter(slots)
        self._demand_waiting = 0
        self._demand_idle = trio.Condition()

    async def fetch(self, region: Region, pages: Sequence[int], *,
                    prefetch: bool = False) -> list[tuple[int, bytes]]:
        """Read and verify ``pages``; return (first page, bytes) per run.

        All or nothing: raises FetchError naming the pages that failed after
        every retry; the verified ones are still returned through
        ``FetchError.partial`` so a caller may keep them.
        """
        runs = coalesce(region, pages, self._run_bytes(region))
        results: list[tuple[int, bytes]] = []
        failed: list[int] = []
        reasons: list[str] = []

        async def one(run: Run) -> None:
            try:
                results.extend(await self._fetch_run(region, run, prefetch))
            except FetchError as e:
                failed.extend(e.pages)
                reasons.append(e.reason)
                results.extend(getattr(e, "partial", []))

        if len(runs) == 1:
            await one(runs[0])
        else:
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(one, run)
        if failed:
            err = FetchError(region.name, sorted(failed), reasons[0])
            err.partial = sorted(results)  # type: ignore[attr-defined]
            raise err
        results.sort()
        return results

    def _run_bytes(self, region: Region) -> int:
        limit = self.max_request
        for d in self.disks:
            limit = min(limit, d.max_request)
        return max(limit, region.page_size)

    async def _read(self, run: Run, ps: int, prefetch: bool) -> bytes:
        disk = self.disks[run.disk]
        if prefetch:
            async with self._demand_idle:
                while self._demand_waiting:
                    await self._demand_idle.wait()
            async with self._slots:
                return await disk.read(run.offset, run.count * ps)
        self._demand_waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._demand_waiting -= 1
            if not self._demand_waiting:
                async with self._demand_idle:
                    self._demand_idle.notify_all()
        try:
            return await disk.read(run.offset, run.count * ps)
        finally:
            self._slots.release()

    async def _fetch_run(self, region: Region, run: Run,
                         prefetch: bool) -> list[tuple[int, bytes]]:
        ps = region.page_size
        todo = [run]
        good: list[tuple[int, bytes]] = []
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.add("fetch_retries")
                await trio.sleep(self.retry_delay * (2 ** (attempt - 1)))
            retry_pages: list[int] = []
            for r in todo:
                self.stats.add("fetch_requests")
                try:
                    data = await self._read(r, ps, prefetch)
                except DiskError as e:
                    self.stats.add("fetch_errors")
                    reason = str(e)
                    log.warning("fetch of %s pages %d..%d failed (attempt %d): %s",
                                region.name, r.first, r.first + r.count - 1, attempt + 1, e)
                    retry_pages.extend(range(r.first, r.first + r.count))
                    continue
                self.stats.add("bytes_fetched", len(data))
                view = memoryview(data)
                bad_here = self._verify(region, r, view)
                if not bad_here:
                    good.append((r.first, data))
                    self.stats.add("pages_fetched", r.count)
                    continue
                reason = "checksum mismatch"
                # keep the verified stretches between bad pages
                start = r.first
                for b in bad_here + [r.first + r.count]:
                    if b > start:
                        i, j = (start - r.first) * ps, (b - r.first) * ps
                        good.append((start, bytes(view[i:j])))
                        self.stats.add("pages_fetched", b - start)
                    start = b + 1
                retry_pages.extend(bad_here)
            if not retry_pages:
                return good
            todo = coalesce(region, retry_pages, self._run_bytes(region))
        log.error("GIVING UP on region %s pages %s after %d attempts: %s",
                  region.name, _ranges(sorted(retry_pages)), self.retries + 1, reason)
        self.stats.add("pages_failed", len(retry_pages))
        err = FetchError(region.name, sorted(retry_pages), reason)
        err.partial = good  # type: ignore[attr-defined]
        raise err

    def _verify(self, region: Region, run: Run, view: memoryview) -> list[int]:
        ps = region.page_size
        sums = region.checksums
        bad = []
        for k in range(run.count):
            p = run.first + k
            if checksum(view[k * ps:(k + 1) * ps]) != sums[p]:
                bad.append(p)
        if bad:
            self.stats.add("checksum_failures", len(bad))
            log.error("CHECKSUM MISMATCH in region %s pages %s (disk %d)",
                      region.name, _ranges(bad), run.disk)
        return bad


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
