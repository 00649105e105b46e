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
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import time
from array import array
from contextlib import AsyncExitStack
from typing import Callable, Sequence

import trio

from . import outputs, volume as vol_id
from .volume import layout
from .capture_types import CaptureError, CaptureResult, Referencer, parse_ram_args
from .progress import Progress
from .disks import Disk, DiskError, open_disk, parse_uri
from .disks.file import FileDisk
from .fileio import pread_into
from .outputs import OutputError
from .trace import pack_pages
from .pagemap import (PAGE_SIZE, ZERO_CHECKSUM, PageMap, PageMapError, PageState, Region,
                      checksum, check_region_name, runs)

#: CaptureError, CaptureResult, Referencer and parse_ram_args live in
#: memfs.capture_types (the disk referencer names them without capture)
__all__ = ["CHUNK", "CaptureError", "CaptureResult", "Referencer", "capture", "layout",
           "parse_ram_args"]

log = logging.getLogger("memfs.capture")

CHUNK = 8 << 20


async def capture(rams: Sequence[tuple[str, str]], volume_uri: str, out: str, *,
                  base: str | None = None, referencer: Referencer | None = None,
                  progress: bool | None = None, view: str | None = None) -> CaptureResult:
    """Capture the RAM files ``rams`` into ``volume_uri`` and write ``out``.

    ``base``: the previous pass (only changed pages are rewritten).  ``view``:
    the page map saved by the memfs mount that serves the RAM files (see the
    module doc): only the pages it marks local are read.  Every expected
    failure is a CaptureError of one line."""
    try:
        return await _capture(rams, volume_uri, out, base=base, referencer=referencer,
                              progress=progress, view=view)
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


def _check_rams(rams: Sequence[tuple[str, str]]) -> tuple[list[int], dict[str, os.stat_result]]:
    """Sizes of the RAM files; refuses bad or repeated names and anything but
    a regular file (a FIFO would block, a device has no size)."""
    sizes, stats, names = [], {}, set()
    for name, path in rams:
        try:
            check_region_name(name)
        except PageMapError as e:
            raise CaptureError(f"--ram {name}={path}: {e}") from None
        if name in names:
            raise CaptureError(f"region name {name!r} is given twice (--ram {name}=...): "
                               "each region needs its own name")
        names.add(name)
        try:
            st = os.stat(path)
        except OSError as e:
            raise CaptureError(f"cannot read RAM {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CaptureError(f"RAM {path} is not a regular file (a FIFO, device or "
                               "directory cannot be guest RAM)")
        if st.st_size <= 0 or st.st_size % PAGE_SIZE:
            raise CaptureError(f"RAM {path} has size {st.st_size}, not a positive multiple "
                               f"of {PAGE_SIZE}")
        sizes.append(st.st_size)
        stats[f"RAM {path}"] = st
    return sizes, stats


def _stat_inputs(rams: dict[str, os.stat_result], referencer: Referencer | None,
                 volume_path: str | None) -> dict[str, os.stat_result]:
    inputs = dict(rams)
    if referencer is not None:
        try:
            parsed = parse_uri(referencer.disk_uri)
            if parsed.scheme == "file":
                inputs[f"disk {referencer.disk_uri}"] = os.stat(parsed.path)
        except (DiskError, OSError):
            pass  # the referencer reports its own disk's errors
    if volume_path is not None:
        try:
            inputs[f"volume {volume_path}"] = os.stat(volume_path)
        except OSError:
            pass
    return inputs


async def _open_volume(volume_uri: str, size: int, rams: dict[str, os.stat_result],
                       referencer: Referencer | None,
                       stack: AsyncExitStack) -> tuple[Disk, bool]:
    """The volume, locked for the capture, and whether it grows as written
    (a regular file); a file volume this capture creates is removed again if
    the capture fails."""
    try:
        parsed = parse_uri(volume_uri)
    except DiskError as e:
        raise CaptureError(f"bad volume: {e}") from None
    if parsed.scheme != "file":
        stack.callback(outputs.lock_uri(volume_uri, parsed).release)
        try:
            disk = await open_disk(volume_uri, writable=True, create_size=size)
        except DiskError as e:
            raise CaptureError(f"cannot open volume: {e}") from None
        stack.push_async_callback(disk.aclose)
        return disk, False
    ov = await trio.to_thread.run_sync(outputs.open_volume, parsed.path,
                                       _stat_inputs(rams, referencer, None))

    def close(exc_type: object, *_: object) -> bool:
        if ov.created and exc_type is not None:  # still locked: nobody else uses it
            outputs.discard(ov.fd, parsed.path)
        os.close(ov.fd)
        return False
    stack.push(close)
    disk = FileDisk(volume_uri, os.dup(ov.fd), ov.size, True)
    stack.push_async_callback(disk.aclose)
    return disk, stat.S_ISREG(ov.st.st_mode)


async def _capture(rams: Sequence[tuple[str, str]], volume_uri: str, out: str, *,
                   base: str | None, referencer: Referencer | None,
                   progress: bool | None, view: str | None) -> CaptureResult:
    t0 = time.monotonic()
    sizes, ram_stats = _check_rams(rams)
    try:
        out_st: os.stat_result | None = os.stat(out)
    except OSError:
        out_st = None
    if out_st is not None:
        outputs.refuse_same({f"page map {out}": out_st},
                            _stat_inputs(ram_stats, referencer, None))
    offsets = layout(sizes)
    id_at = vol_id.identity_offset(sizes)
    async with AsyncExitStack() as stack:
        stack.callback(outputs.lock_pagemap(out).release)
        base_pm = _load_base(base, rams, sizes, volume_uri) if base else None
        view_pm = _load_view(view, rams, sizes) if view else None
        volume, grows = await _open_volume(volume_uri, offsets[-1], ram_stats, referencer,
                                           stack)
        if volume.size < offsets[-1] and not grows:
            raise CaptureError(f"volume {volume_uri} holds {volume.size} bytes; the RAM "
                               f"needs {offsets[-1]} (with its 4 KiB identity block)")
        try:
            out_st = os.stat(out)
        except OSError:
            out_st = None
        if out_st is not None:  # --out and --volume may name the same file
            outputs.refuse_same({f"page map {out}": out_st},
                                _stat_inputs(ram_stats, referencer,
                                             parse_uri(volume_uri).path
                                             if "://" not in volume_uri else None))
        ident = await _volume_identity(volume, id_at, base, base_pm, volume_uri)
        pm = PageMap()
        vol_index = pm.disk_index(volume_uri)
        result = CaptureResult(volume=volume_uri, pagemap=out)
        bar = Progress(sum(sizes), progress)
        for (name, path), size, voff in zip(rams, sizes, offsets):
            region = Region.empty(name, size)
            old = base_pm.region(name) if base_pm else None
            seen = None
            ranges = None
            if view_pm is not None:
                ranges = _keep_from_view(region, view_pm, pm, result)
                bar.update(size - sum(n for _, n in ranges), name)
                seen = (view_pm.region(name), view_pm)
            await _capture_region(path, region, volume, vol_index, voff, old, base_pm, pm,
                                  referencer, result, lambda n: bar.update(n, name), ranges,
                                  seen)
            pm.regions.append(region)
            result.regions[name] = size
        await volume.flush()
        pm.meta = {"created": time.time(), "pass": (base_pm.meta.get("pass", 1) + 1)
                   if base_pm else 1, "volume": volume_uri}
        _record_volumes(pm, volume_uri, ident, id_at, base_pm, view_pm)
        if result.hot:  # pages the guest is busy with: worth fetching first
            pm.meta["hot"] = {name: pack_pages(pages) for name, pages in result.hot.items()}
        try:
            await trio.to_thread.run_sync(pm.save, out)
        except OSError as e:
            raise CaptureError(f"cannot write page map {out}: {e.strerror}") from None
    result.seconds = round(time.monotonic() - t0, 3)
    return result


async def _volume_identity(volume: Disk, at: int, base: str | None, base_pm: PageMap | None,
                           volume_uri: str) -> str:
    """The volume's identity; with a base, the one the base recorded (a
    recreated volume is refused before anything is written to it)."""
    try:
        if base_pm is not None:
            want = vol_id.recorded(base_pm.meta).get(volume_uri)
            if want is not None:
                have = await vol_id.read_identity(volume, want[1])
                if have != want[0] or want[1] != at:
                    raise CaptureError(
                        f"base page map {base} was captured to another volume {volume_uri} "
                        f"(identity {want[0]}; this one has {have or 'none'}): the volume was "
                        "recreated or replaced, and the base's pages are not on it; capture "
                        "without --base")
                return want[0]
            log.warning("base page map %s records no identity for volume %s", base, volume_uri)
        return await vol_id.ensure_identity(volume, at)
    except vol_id.VolumeError as e:
        raise CaptureError(str(e)) from None


def _record_volumes(pm: PageMap, volume_uri: str, ident: str, at: int,
                    *sources: PageMap | None) -> None:
    """The new volume's identity, and those of the base's or view's volumes
    that pages still refer to."""
    for src in sources:
        if src is None:
            continue
        try:
            known = vol_id.recorded(src.meta)
        except PageMapError:
            continue
        for uri, (other, other_at) in known.items():
            if uri in pm.disks and uri != volume_uri:
                vol_id.record(pm.meta, uri, other, other_at)
    vol_id.record(pm.meta, volume_uri, ident, at)


def _load_base(base: str, rams: Sequence[tuple[str, str]], sizes: list[int],
               volume_uri: str) -> PageMap:
    try:
        pm = PageMap.load(base)
    except PageMapError as e:
        raise CaptureError(f"base page map: {e}") from None
    want = {n: s for (n, _), s in zip(rams, sizes)}
    have = {r.name: r.size for r in pm.regions}
    if want != have:
        raise CaptureError(f"base page map {base} has regions {have}, the RAM has {want}")
    if volume_uri not in pm.disks:
        raise CaptureError(f"base page map {base} does not use volume {volume_uri}")
    return pm


def _load_view(view: str, rams: Sequence[tuple[str, str]], sizes: list[int]) -> PageMap:
    try:
        pm = PageMap.load(view)
    except PageMapError as e:
        raise CaptureError(f"mount view: {e}") from None
    if pm.meta.get("view") != "mount":
        raise CaptureError(f"{view} is not a page map saved by a memfs mount (control "
                           "command 'save')")
    want = {n: s for (n, _), s in zip(rams, sizes)}
    have = {r.name: r.size for r in pm.regions}
    if want != have:
        raise CaptureError(f"mount view {view} has regions {have}, the RAM has {want}")
    return pm


def _keep_from_view(region: Region, view_pm: PageMap, pm: PageMap,
                    result: CaptureResult) -> list[tuple[int, int]]:
    """Fill ``region`` from the mount view: remote pages keep their location,
    zero pages stay zero.  Returns the (offset, length) byte ranges to read."""
    vr = view_pm.region(region.name)
    n = region.npages
    disk_map = bytes(pm.disk_index(uri) for uri in view_pm.disks) + bytes(256 - len(view_pm.disks))
    for a, b in runs(vr.states, PageState.REMOTE):
        region.states[a:b] = vr.states[a:b]
        region.disks[a:b] = vr.disks[a:b].translate(disk_map)
        region.offsets[a:b] = vr.offsets[a:b]
        region.checksums[a:b] = vr.checksums[a:b]
    kept = vr.count(PageState.REMOTE)
    zero = vr.count(PageState.ZERO)
    result.pages_kept += kept
    result.pages_zero += zero
    result.pages_total += kept + zero
    ps = region.page_size
    ranges = []
    for a, b in runs(vr.states, PageState.LOCAL):
        for c in range(a * ps, b * ps, CHUNK):
            ranges.append((c, min(b * ps, c + CHUNK) - c))
    assert sum(k for _, k in ranges) // ps + kept + zero == n
    return ranges


#: read buffers in rotation: one being filled, two in the channel, one being
#: classified, one spare
NBUF = 5
#: buffers kept between captures (migrate's passes): a fresh 8 MiB buffer
#: costs a page fault per page
_POOL: list[bytearray] = []


async def _read_chunks(path: str, size: int, send: trio.MemorySendChannel,
                       ranges: list[tuple[int, int]] | None, bufs: list[bytearray]) -> None:
    """Send (offset, data) for the whole file, or for the byte ``ranges``
    (each at most CHUNK).  ``data`` is a view of a reused buffer: valid until
    the receiver asks for the item NBUF - 2 after it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ranges is None:
            ranges = [(off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
        else:
            # A file in a memfs mount: no read-ahead, which would fault in
            # the neighbours we must not touch.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        async with send:
            # one thread hop per CHUNK bytes, however small the ranges
            batch: list[tuple[int, int]] = []
            batch_bytes = 0
            nbatch = 0
            for i, (off, n) in enumerate(ranges):
                batch.append((off, n))
                batch_bytes += n
                last = i == len(ranges) - 1
                if last or batch_bytes + ranges[i + 1][1] > CHUNK:
                    buf = memoryview(bufs[nbatch % NBUF])
                    nbatch += 1
                    await trio.to_thread.run_sync(_pread_ranges, fd, batch, buf)
                    at = 0
                    for o, k in batch:
                        await send.send((o, buf[at:at + k]))
                        at += k
                    batch, batch_bytes = [], 0
    finally:
        os.close(fd)


def _pread_ranges(fd: int, ranges: list[tuple[int, int]], buf: memoryview) -> None:
    at = 0
    for off, n in ranges:
        _pread_full(fd, off, buf[at:at + n])
        at += n


def _pread_full(fd: int, off: int, into: memoryview) -> None:
    done = pread_into(fd, off, into)
    if done != len(into):
        raise CaptureError(f"RAM file ended early at {off + done}")


async def _capture_region(path: str, region: Region, volume: Disk, vol_index: int,
                          voff: int, old: Region | None, base_pm: PageMap | None,
                          pm: PageMap, referencer: Referencer | None,
                          result: CaptureResult, tick: Callable[[int], None],
                          ranges: list[tuple[int, int]] | None = None,
                          seen: tuple[Region, PageMap] | None = None) -> None:
    ps = region.page_size
    zero_chunk = bytes(CHUNK)
    send, recv = trio.open_memory_channel[tuple[int, memoryview]](NBUF - 3)
    bufs = [_POOL.pop() if _POOL else bytearray(CHUNK) for _ in range(NBUF)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_chunks, path, region.size, send, ranges, bufs,
                           name=f"read {path}")
        async with recv:
            async for off, data in recv:
                first = off // ps
                npages = len(data) // ps
                result.pages_total += npages
                result.pages_read += npages
                if _is_zero(data, zero_chunk):
                    result.pages_zero += npages  # Region.empty made them zero pages
                    tick(len(data))
                    continue
                if old is not None and _unchanged_chunk(region, first, memoryview(data),
                                                        old, base_pm, pm, result):
                    tick(len(data))
                    continue
                await _capture_chunk(region, first, memoryview(data), volume, vol_index,
                                     voff, old, base_pm, pm, referencer, result, seen)
                tick(len(data))
    # every item is consumed: the buffers are free for the next region or pass
    _POOL.extend(bufs[:max(0, NBUF - len(_POOL))])


def _unchanged_chunk(region: Region, first: int, view: memoryview, old: Region,
                     base_pm: PageMap | None, pm: PageMap, result: CaptureResult) -> bool:
    """The fast path of a later pass: if no page of the chunk changed since
    the base pass, take the base's entries for the whole chunk and return
    True; else return False and leave everything as it was."""
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
    assert base_pm is not None
    disk_map = bytes(pm.disk_index(u) for u in base_pm.disks) + bytes(256 - len(base_pm.disks))
    region.states[first:first + n] = states
    region.disks[first:first + n] = old.disks[first:first + n].translate(disk_map)
    region.offsets[first:first + n] = old.offsets[first:first + n]
    region.checksums[first:first + n] = sums
    result.pages_zero += zeros
    result.pages_unchanged += n - zeros
    return True


def _is_zero(data: memoryview, zeros: bytes) -> bool:
    """``data`` is all zeros (comparing a memoryview byte by byte is slow:
    hash first, compare bytes only when the hash says zero)."""
    n = len(data)
    return checksum(data) == _zero_sum(n) and data.tobytes() == zeros[:n]


@functools.lru_cache(maxsize=8)
def _zero_sum(n: int) -> int:
    return checksum(bytes(n))


async def _capture_chunk(region: Region, first: int, view: memoryview, volume: Disk,
                         vol_index: int, voff: int, old: Region | None,
                         base_pm: PageMap | None, pm: PageMap,
                         referencer: Referencer | None, result: CaptureResult,
                         seen: tuple[Region, PageMap] | None = None) -> None:
    """Classify and write the pages of ``view``.  ``seen``: the mount view;
    a page it holds locally whose content is still the one it arrived with
    (same checksum) keeps the location it arrived from."""
    ps = region.page_size
    zero = bytes(ps)
    npages = len(view) // ps
    write_from = -1  # start (page index within chunk) of a run of pages to write

    async def flush(upto: int) -> None:
        nonlocal write_from
        if write_from >= 0:
            a, b = write_from * ps, upto * ps
            await volume.write(voff + (first + write_from) * ps, view[a:b])
            result.bytes_written += b - a
            write_from = -1

    for k in range(npages):
        p = first + k
        page = view[k * ps:(k + 1) * ps]
        csum = checksum(page)
        if csum == ZERO_CHECKSUM and page.tobytes() == zero:
            await flush(k)
            result.pages_zero += 1
            continue
        if old is not None and old.states[p] == PageState.REMOTE and old.checksums[p] == csum:
            await flush(k)
            assert base_pm is not None
            region.set_remote(p, pm.disk_index(base_pm.disks[old.disks[p]]), old.offsets[p], csum)
            result.pages_unchanged += 1
            continue
        if seen is not None:
            sr, spm = seen
            if sr.states[p] == PageState.LOCAL and sr.checksums[p] == csum \
                    and sr.disks[p] < len(spm.disks):
                await flush(k)
                region.set_remote(p, pm.disk_index(spm.disks[sr.disks[p]]), sr.offsets[p], csum)
                result.pages_unchanged += 1
                continue
        if referencer is not None:
            where = await referencer.find(csum, bytes(page))
            if where is not None:
                await flush(k)
                region.set_remote(p, pm.disk_index(referencer.disk_uri), where, csum)
                result.pages_referenced += 1
                continue
        if write_from < 0:
            write_from = k
        region.set_remote(p, vol_index, voff + p * ps, csum)
        result.pages_written += 1
        if old is not None and old.states[p] != PageState.ZERO:
            result.hot_pages += 1
            result.hot.setdefault(region.name, []).append(p)
    await flush(npages)
