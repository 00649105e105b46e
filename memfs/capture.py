"""Capture (source host): guest RAM -> migration volume + page map.

Every page is classified: zero (no location), unchanged since the base pass
(keeps its location), or new (written to the volume at its fixed identity
offset and checksummed).  RAM is read in large sequential chunks by a reader
task while the main task classifies and writes, so the disk and the CPU work
at the same time.

Onward migration of a guest whose RAM is itself a memfs file: ``view`` is the
page map that mount saved (control command ``save``; ``PageServer.view``).
Its REMOTE pages were never handed to the kernel, so they are not read at all
(reading them through the mount would fetch them): they keep their location.
Its ZERO pages were never handed out either and stay zero.  Only its LOCAL
pages are read (through the mount, page cache included) and classified.

Outputs (memfs.outputs, memfs.volume): the volume and the page map are locked
for the whole capture; neither may be a RAM file or the referenced disk; the
volume carries an identity block after the RAM layout, which the page map
records and which a ``base`` must share.  A capture that fails leaves no
page map, no temporary file, and no volume it created.

The parts: memfs.capture_types (the error, result and Referencer others
name), memfs.capture_inputs (RAM files, base, view, volume: checked before a
page is copied), memfs.capture_read (the reader and its buffers), and here
the pass itself: classify every page and write the new ones.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from array import array
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Callable, Sequence

import trio

from . import outputs, volume as vol_id
from .capture_inputs import (check_rams, keep_from_view, load_base, load_view, open_volume,
                             record_volumes, stat_inputs, volume_identity)
from .capture_read import CHUNK, NBUF, BufferPool, read_chunks
from .capture_types import CaptureError, CaptureResult, Referencer, parse_ram_args
from .disks import Disk, DiskError, parse_uri
from .outputs import OutputError
from .pagemap import (ZERO_CHECKSUM, PageMap, PageMapError, PageState, Region, checksum,
                      runs)
from .progress import Progress
from .trace import pack_pages
from .volume import layout

#: CaptureError, CaptureResult, Referencer and parse_ram_args live in
#: memfs.capture_types (the disk referencer names them without capture)
__all__ = ["CHUNK", "BufferPool", "CaptureError", "CaptureResult", "Referencer", "capture",
           "layout", "parse_ram_args"]

log = logging.getLogger("memfs.capture")


@dataclass
class _Pass:
    """What every region of one capture pass writes to and compares with,
    bundled once rather than handed down as a dozen parameters."""

    volume: Disk
    vol_index: int              #: the volume's disk number in ``pm``
    pm: PageMap                 #: the page map being built
    result: CaptureResult
    pool: BufferPool
    base_pm: PageMap | None = None
    view_pm: PageMap | None = None
    referencer: Referencer | None = None


@dataclass
class _RegionJob:
    """One RAM file and the region it becomes."""

    path: str
    region: Region
    voff: int                   #: where the region's pages go on the volume
    tick: Callable[[int], None]
    old: Region | None = None   #: the base pass's region
    seen: Region | None = None  #: the mount view's region
    #: byte ranges to read (each at most CHUNK); None: the whole file
    ranges: list[tuple[int, int]] | None = None


async def capture(rams: Sequence[tuple[str, str]], volume_uri: str, out: str, *,
                  base: str | None = None, referencer: Referencer | None = None,
                  progress: bool | None = None, view: str | None = None,
                  pool: BufferPool | None = None) -> CaptureResult:
    """Capture the RAM files ``rams`` into ``volume_uri`` and write ``out``.

    ``base``: the previous pass (only changed pages are rewritten).  ``view``:
    the page map saved by the memfs mount that serves the RAM files (see the
    module doc): only the pages it marks local are read.  ``pool``: read
    buffers to reuse across passes.  Every expected failure is a
    CaptureError of one line."""
    try:
        return await _capture(rams, volume_uri, out, base=base, referencer=referencer,
                              progress=progress, view=view, pool=pool or BufferPool())
    except BaseExceptionGroup as eg:  # a nursery's: the first real error is the story
        leaf = _first_error(eg)
        if isinstance(leaf, (CaptureError, DiskError, OutputError, PageMapError, OSError)):
            raise _as_capture_error(leaf) from None
        raise
    except (DiskError, OutputError, PageMapError, OSError) as e:
        raise _as_capture_error(e) from None


def _first_error(eg: BaseExceptionGroup) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            e = _first_error(e)
        if not isinstance(e, trio.Cancelled):
            return e
    return eg


def _as_capture_error(e: BaseException) -> CaptureError:
    if isinstance(e, CaptureError):
        return e
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return CaptureError(f"{where}{e.strerror or e}")
    return CaptureError(str(e))


def _refuse_out(out: str, ram_stats: dict[str, os.stat_result],
               referencer: Referencer | None, volume_path: str | None = None) -> None:
    """--out must be none of the inputs (nor the volume, once it exists)."""
    try:
        out_st = os.stat(out)
    except OSError:
        return
    outputs.refuse_same({f"page map {out}": out_st},
                        stat_inputs(ram_stats, referencer, volume_path))


async def _capture(rams: Sequence[tuple[str, str]], volume_uri: str, out: str, *,
                   base: str | None, referencer: Referencer | None,
                   progress: bool | None, view: str | None,
                   pool: BufferPool) -> CaptureResult:
    t0 = time.monotonic()
    sizes, ram_stats = check_rams(rams)
    _refuse_out(out, ram_stats, referencer)
    offsets = layout(sizes)
    id_at = vol_id.identity_offset(sizes)
    async with AsyncExitStack() as stack:
        stack.callback(outputs.lock_pagemap(out).release)
        base_pm = load_base(base, rams, sizes, volume_uri) if base else None
        view_pm = load_view(view, rams, sizes) if view else None
        volume, grows = await open_volume(volume_uri, offsets[-1], ram_stats, referencer, stack)
        if volume.size < offsets[-1] and not grows:
            raise CaptureError(f"volume {volume_uri} holds {volume.size} bytes; the RAM "
                               f"needs {offsets[-1]} (with its 4 KiB identity block)")
        # --out and --volume may name the same file
        _refuse_out(out, ram_stats, referencer,
                    parse_uri(volume_uri).path if "://" not in volume_uri else None)
        ident = await volume_identity(volume, id_at, base, base_pm, volume_uri)
        pm = PageMap()
        p = _Pass(volume, pm.disk_index(volume_uri), pm,
                  CaptureResult(volume=volume_uri, pagemap=out), pool, base_pm, view_pm,
                  referencer)
        await _capture_regions(p, rams, sizes, offsets, Progress(sum(sizes), progress))
        await volume.flush()
        pm.meta = {"created": time.time(), "pass": (base_pm.meta.get("pass", 1) + 1)
                   if base_pm else 1, "volume": volume_uri}
        record_volumes(pm, volume_uri, ident, id_at, base_pm, view_pm)
        if p.result.hot:  # pages the guest is busy with: worth fetching first
            pm.meta["hot"] = {name: pack_pages(pages) for name, pages in p.result.hot.items()}
        try:
            await trio.to_thread.run_sync(pm.save, out)
        except OSError as e:
            raise CaptureError(f"cannot write page map {out}: {e.strerror}") from None
    p.result.seconds = round(time.monotonic() - t0, 3)
    return p.result


async def _capture_regions(p: _Pass, rams: Sequence[tuple[str, str]], sizes: list[int],
                           offsets: list[int], bar: Progress) -> None:
    for (name, path), size, voff in zip(rams, sizes, offsets):
        job = _RegionJob(path, Region.empty(name, size), voff,
                         lambda n, name=name: bar.update(n, name),  # type: ignore[misc]
                         old=p.base_pm.region(name) if p.base_pm else None)
        if p.view_pm is not None:
            job.ranges = keep_from_view(job.region, p.view_pm, p.pm, p.result)
            bar.update(size - sum(n for _, n in job.ranges), name)
            job.seen = p.view_pm.region(name)
        await _capture_region(p, job)
        p.pm.regions.append(job.region)
        p.result.regions[name] = size


async def _capture_region(p: _Pass, job: _RegionJob) -> None:
    region, result = job.region, p.result
    ps = region.page_size
    zero_chunk = bytes(CHUNK)
    send, recv = trio.open_memory_channel[tuple[int, memoryview]](NBUF - 3)
    bufs = p.pool.take()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_chunks, job.path, region.size, send, job.ranges, bufs,
                           name=f"read {job.path}")
        async with recv:
            async for off, data in recv:
                first = off // ps
                npages = len(data) // ps
                result.pages_total += npages
                result.pages_read += npages
                if _is_zero(data, zero_chunk):
                    result.pages_zero += npages  # Region.empty made them zero pages
                elif job.old is None or not _unchanged_chunk(p, job, first, data):
                    await _capture_chunk(p, job, first, data)
                job.tick(len(data))
    # every item is consumed: the buffers are free for the next region or pass
    p.pool.give(bufs)


def _unchanged_chunk(p: _Pass, job: _RegionJob, first: int, view: memoryview) -> bool:
    """The fast path of a later pass: if no page of the chunk changed since
    the base pass, take the base's entries for the whole chunk and return
    True; else return False and leave everything as it was."""
    region, old, base_pm = job.region, job.old, p.base_pm
    assert old is not None and base_pm is not None
    ps = region.page_size
    n = len(view) // ps
    sums = array("Q", [checksum(view[i:i + ps]) for i in range(0, n * ps, ps)])
    if sums != old.checksums[first:first + n]:
        return False
    states = old.states[first:first + n]
    if PageState.LOCAL in states:
        return False
    zeros = 0
    for a, b in runs(states, PageState.ZERO):
        zeros += b - a
        if view[a * ps:b * ps].tobytes() != bytes((b - a) * ps):
            return False        # a zero page became a page with the zero checksum
    disk_map = bytes(p.pm.disk_index(u) for u in base_pm.disks) + \
        bytes(256 - len(base_pm.disks))
    region.states[first:first + n] = states
    region.disks[first:first + n] = old.disks[first:first + n].translate(disk_map)
    region.offsets[first:first + n] = old.offsets[first:first + n]
    region.checksums[first:first + n] = sums
    p.result.pages_zero += zeros
    p.result.pages_unchanged += n - zeros
    return True


def _is_zero(data: memoryview, zeros: bytes) -> bool:
    """``data`` is all zeros (comparing a memoryview byte by byte is slow:
    hash first, compare bytes only when the hash says zero)."""
    n = len(data)
    return checksum(data) == _zero_sum(n) and data.tobytes() == zeros[:n]


@functools.lru_cache(maxsize=8)
def _zero_sum(n: int) -> int:
    return checksum(bytes(n))


async def _capture_chunk(p: _Pass, job: _RegionJob, first: int, view: memoryview) -> None:
    """Classify and write the pages of ``view``: runs of new pages are
    written to the volume in one request each."""
    ps = job.region.page_size
    write_from = -1  # start (page index within chunk) of a run of pages to write

    async def flush(upto: int) -> None:
        nonlocal write_from
        if write_from >= 0:
            a, b = write_from * ps, upto * ps
            await p.volume.write(job.voff + (first + write_from) * ps, view[a:b])
            p.result.bytes_written += b - a
            write_from = -1

    for k in range(len(view) // ps):
        page = view[k * ps:(k + 1) * ps]
        if await _keep_page(p, job, first + k, page):
            await flush(k)
        elif write_from < 0:
            write_from = k
    await flush(len(view) // ps)


async def _keep_page(p: _Pass, job: _RegionJob, pg: int, page: memoryview) -> bool:
    """Record page ``pg`` of the region; True if its content need not be
    written (zero, unchanged since the base, still what the mount view had,
    or on a referenced disk), False if it goes to the volume.

    ``job.seen``: a page the mount view holds locally whose content is still
    the one it arrived with (same checksum) keeps the location it arrived from."""
    region, old, res = job.region, job.old, p.result
    csum = checksum(page)
    if csum == ZERO_CHECKSUM and page.tobytes() == bytes(len(page)):
        res.pages_zero += 1
        return True
    if old is not None and old.states[pg] == PageState.REMOTE and old.checksums[pg] == csum:
        assert p.base_pm is not None
        region.set_remote(pg, p.pm.disk_index(p.base_pm.disks[old.disks[pg]]),
                          old.offsets[pg], csum)
        res.pages_unchanged += 1
        return True
    sr, spm = job.seen, p.view_pm
    if sr is not None and spm is not None and sr.states[pg] == PageState.LOCAL \
            and sr.checksums[pg] == csum and sr.disks[pg] < len(spm.disks):
        region.set_remote(pg, p.pm.disk_index(spm.disks[sr.disks[pg]]), sr.offsets[pg], csum)
        res.pages_unchanged += 1
        return True
    if p.referencer is not None:
        where = await p.referencer.find(csum, bytes(page))
        if where is not None:
            region.set_remote(pg, p.pm.disk_index(p.referencer.disk_uri), where, csum)
            res.pages_referenced += 1
            return True
    region.set_remote(pg, p.vol_index, job.voff + pg * region.page_size, csum)
    res.pages_written += 1
    if old is not None and old.states[pg] != PageState.ZERO:
        res.hot_pages += 1
        res.hot.setdefault(region.name, []).append(pg)
    return False
