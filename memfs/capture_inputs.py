"""What a capture reads and checks before it copies a page: the RAM files,
the base pass, the mount view, the volume (locked, created if need be) and
its identity.  Every refusal is a CaptureError of one line."""

from __future__ import annotations

import logging
import os
import stat
from contextlib import AsyncExitStack
from typing import Sequence

import trio

from . import outputs, volume as vol_id
from .capture_types import CaptureError, CaptureResult, Referencer
from .disks import Disk, DiskError, open_disk, parse_uri
from .disks.file import FileDisk
from .capture_read import CHUNK
from .pagemap import PAGE_SIZE, PageMap, PageMapError, PageState, Region, check_region_name, runs

log = logging.getLogger("memfs.capture")


def check_rams(rams: Sequence[tuple[str, str]]) -> tuple[list[int], dict[str, os.stat_result]]:
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


def stat_inputs(rams: dict[str, os.stat_result], referencer: Referencer | None,
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


async def open_volume(volume_uri: str, size: int, rams: dict[str, os.stat_result],
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
                                       stat_inputs(rams, referencer, None))

    def close(exc_type: object, *_: object) -> bool:
        if ov.created and exc_type is not None:  # still locked: nobody else uses it
            outputs.discard(ov.fd, parsed.path)
        os.close(ov.fd)
        return False
    stack.push(close)
    disk = FileDisk(volume_uri, os.dup(ov.fd), ov.size, True)
    stack.push_async_callback(disk.aclose)
    return disk, stat.S_ISREG(ov.st.st_mode)


async def volume_identity(volume: Disk, at: int, base: str | None, base_pm: PageMap | None,
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


def record_volumes(pm: PageMap, volume_uri: str, ident: str, at: int,
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


def load_base(base: str, rams: Sequence[tuple[str, str]], sizes: list[int],
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


def load_view(view: str, rams: Sequence[tuple[str, str]], sizes: list[int]) -> PageMap:
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


def keep_from_view(region: Region, view_pm: PageMap, pm: PageMap,
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
