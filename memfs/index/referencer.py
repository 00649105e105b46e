"""The capture Referencer over an indexed disk: a page whose checksum is in
the index and whose bytes equal that block on the disk gets the block's
location instead of a copy.  A page map may only refer to data that will not
change (DESIGN.md invariant 6): a disk that is not read-only is refused unless
the caller says it is frozen."""

from __future__ import annotations

import logging
import os
import stat
from collections import OrderedDict

import trio

from ..capture_types import CaptureError
from ..disks import Disk, DiskError, open_disk, parse_uri
from ..pagemap import checksum
from .format import BLOCK, DiskIndex, DiskIndexError

log = logging.getLogger("memfs.index")

_BLKROGET = 0x125E


def _file_read_only(path: str) -> tuple[bool, str]:
    """Is the file (or block device) at ``path`` read-only, and why (not)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CaptureError(f"disk {path}: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        import fcntl
        import struct
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ro = struct.unpack("i", fcntl.ioctl(fd, _BLKROGET, b"\0" * 4))[0]
            finally:
                os.close(fd)
        except OSError as e:
            raise CaptureError(f"disk {path}: {e.strerror}") from None
        return bool(ro), "the block device is not read-only (blockdev --setro)"
    if not stat.S_ISREG(st.st_mode):
        raise CaptureError(f"disk {path} is neither a regular file nor a block device")
    if st.st_mode & 0o222:
        return False, f"the file is writable (mode {stat.S_IMODE(st.st_mode):04o}; chmod a-w)"
    return True, ""


def _refuse(uri: str, why: str) -> CaptureError:
    return CaptureError(
        f"disk {uri} is not read-only: {why}. A page map may only refer to data that "
        "will not change: freeze the disk (a qcow2 external snapshot, see "
        "docs/disk-references.rst) and make it read-only, or pass --disk-frozen if you "
        "guarantee that it will not change while the page map refers to it")


class DiskReferencer:
    """The capture Referencer over one indexed disk: candidates by hash, then a
    byte comparison with the block read from the disk.  Disk reads are whole
    windows (1 MiB by default) kept in a small LRU, so that the many pages of a
    file the guest read in one go cost one read per window, not one per page."""

    def __init__(self, disk_uri: str, index: DiskIndex, frozen: bool = False,
                 window: int = 1 << 20, cache_windows: int = 64) -> None:
        if window < BLOCK or window % BLOCK:
            raise ValueError("window must be a multiple of the block size")
        self.disk_uri = disk_uri
        self.index = index
        self.frozen = frozen
        self.window = window
        self.cache_windows = max(cache_windows, 1)
        self._disk: Disk | None = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, trio.Event] = {}
        self.stats = {"lookups": 0, "candidates": 0, "hits": 0, "mismatches": 0,
                      "windows_read": 0, "bytes_read": 0}

    async def open(self) -> None:
        """Open the disk read-only and check that it may be referenced and
        still matches the index.  find() calls it when needed."""
        if self._disk is not None:
            return
        try:
            disk = await open_disk(self.disk_uri)
        except DiskError as e:
            raise CaptureError(f"cannot open disk: {e}") from None
        try:
            info = getattr(disk, "info", None)
            if info is not None and not self.frozen and not info.read_only:
                raise _refuse(self.disk_uri, "the NBD export is not advertised read-only "
                                             "(qemu-nbd --read-only)")
            if disk.size != self.index.size:
                raise CaptureError(f"disk {self.disk_uri} has {disk.size} bytes; its index "
                                   f"was made for {self.index.size}: re-run memfs index")
            self._disk = disk
            await self._check_sample()
        except BaseException:
            self._disk = None
            with trio.CancelScope(shield=True):
                await disk.aclose()
            raise

    async def _check_sample(self, n: int = 16) -> None:
        """A few indexed blocks must still hold their content: a stale index
        would otherwise only show as misses."""
        total = len(self.index)
        for i in sorted({total * k // n for k in range(n)} if total else ()):
            off = self.index.blocks[i] * BLOCK
            if checksum(await self._block(off)) != self.index.hashes[i]:
                raise CaptureError(f"the index of {self.disk_uri} is stale: the block at "
                                   f"{off} changed since it was indexed; re-run memfs index")

    async def find(self, csum: int, page: bytes) -> int | None:
        self.stats["lookups"] += 1
        off = self.index.lookup(csum)
        if off is None or len(page) != BLOCK:
            return None
        self.stats["candidates"] += 1
        if self._disk is None:
            await self.open()
        try:
            data = await self._block(off)
        except DiskError as e:
            raise CaptureError(f"reading a candidate block: {e}") from None
        if data != page:
            self.stats["mismatches"] += 1
            return None
        self.stats["hits"] += 1
        return off

    async def _block(self, off: int) -> memoryview:
        w = off // self.window
        data = await self._window(w)
        lo = off - w * self.window
        return memoryview(data)[lo:lo + BLOCK]

    async def _window(self, w: int) -> bytes:
        while True:
            data = self._cache.get(w)
            if data is not None:
                self._cache.move_to_end(w)
                return data
            ev = self._loading.get(w)
            if ev is None:
                break
            await ev.wait()
        ev = self._loading[w] = trio.Event()
        try:
            assert self._disk is not None
            start = w * self.window
            n = min(self.window, self.index.size - start)
            data = await self._disk.read(start, n)
            self.stats["windows_read"] += 1
            self.stats["bytes_read"] += n
            self._cache[w] = data
            while len(self._cache) > self.cache_windows:
                self._cache.popitem(last=False)
            return data
        finally:
            del self._loading[w]
            ev.set()

    async def aclose(self) -> None:
        self._cache.clear()
        if self._disk is not None:
            disk, self._disk = self._disk, None
            await disk.aclose()


def _load_for_capture(disk_uri: str, index_path: str, frozen: bool) -> DiskReferencer:
    try:
        index = DiskIndex.load(index_path)
    except DiskIndexError as e:
        raise CaptureError(f"index: {e}") from None
    try:
        parsed = parse_uri(disk_uri)
    except DiskError as e:
        raise CaptureError(str(e)) from None
    if index.disk != disk_uri:
        log.info("index %s was made from %s; referencing it as %s", index_path, index.disk,
                 disk_uri)
    if parsed.scheme == "file" and not frozen:
        ro, why = _file_read_only(parsed.path)
        if not ro:
            raise _refuse(disk_uri, why)
    if parsed.scheme == "rbd" and not parsed.snap and not frozen:
        raise _refuse(disk_uri, "an RBD image can change (name one of its snapshots: "
                                "rbd:POOL/IMAGE@SNAP)")
    return DiskReferencer(disk_uri, index, frozen)


def open_referencer(disk_uri: str, index_path: str, frozen: bool = False) -> DiskReferencer:
    """A Referencer for capture; raises CaptureError if the index cannot be
    loaded, or the disk is not read-only (and not ``frozen``), does not match
    the index, or cannot be opened.  Outside trio this connects once to
    check the disk (an NBD server must accept a later connection: qemu-nbd -t);
    inside trio, use :func:`aopen_referencer`, or the check happens on the
    first find()."""
    ref = _load_for_capture(disk_uri, index_path, frozen)
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        async def probe() -> None:
            await ref.open()
            await ref.aclose()
        trio.run(probe)
    return ref


async def aopen_referencer(disk_uri: str, index_path: str,
                           frozen: bool = False) -> DiskReferencer:
    """open_referencer for async callers: the disk stays open (aclose it)."""
    ref = _load_for_capture(disk_uri, index_path, frozen)
    await ref.open()
    return ref
