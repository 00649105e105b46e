"""The local store: pages the destination owns (guest writes, completed fetches).

One sparse file per region, page i at byte i * page_size.  It is a real file
on a local disk so that the pages survive page-cache eviction of the FUSE
file and, with a state directory (whose journal records which pages it
holds), the death of the daemon.  Without one (``--store`` not given) the
files have no name at all (O_TMPFILE in /var/tmp): nothing could continue
them, and a killed daemon leaves nothing behind.

Two promises: a store file that already holds pages is never truncated or
reused by a fresh mount (only a resumed one continues it), and a write is
either kept whole or refused (ENOSPC) with the old bytes untouched: blocks
are reserved with fallocate() before the first byte is written.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from typing import Callable

import trio

from ._fast import span
from .fileio import IOV_MAX, PRIVATE, create_new, nowait_pread, pread_into, pwrite_all


class StoreError(Exception):
    """The store cannot be opened as asked; the message says why."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, offset: int, length: int) -> None:
    """Reserve blocks for ``[offset, offset+length)`` without changing any
    byte already there: ENOSPC now rather than half-way through a write.
    Nothing where the file system cannot (EOPNOTSUPP)."""
    if _libc.fallocate(fd, 0, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))


#: writes up to this size go to the page cache on the loop (LocalStore.write)
_INLINE_WRITE = 128 << 10


def _reserve_and_write(fd: int, offset: int, data: bytes | memoryview) -> None:
    fallocate(fd, offset, len(data))
    pwrite_all(fd, offset, data)


def _length(data: bytes | memoryview | list[memoryview]) -> int:
    return sum(len(d) for d in data) if isinstance(data, list) else len(data)


_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

#: zero pages between two stretches of fetched pages, up to this many bytes,
#: are written too (as zeros), so that a batch is one pwritev, not one per
#: stretch: 4 MiB of the bench's mix (1024 pages in 342 stretches) took
#: 3.2 ms in 342 writes and 1.65 ms in one with the gaps filled (measured)
BRIDGE_ZEROS = 16 << 10
_ZEROS = memoryview(bytes(BRIDGE_ZEROS))


def page_writes(page_size: int, spans: list[tuple[int, int]], got: dict[int, memoryview],
                zero: Callable[[int, int], bool]) -> list[tuple[int, list[memoryview]]]:
    """The store writes of the fetched pages ``got`` in ``spans`` ((first,
    count), ascending): two stretches at most BRIDGE_ZEROS bytes apart go in
    one write when ``zero(end, next_first)`` says that every page between is
    a zero page (whose slot is never read as data, and which no write has
    reached: the caller holds the region lock).  A stretch whose pages lie
    in order in the buffer they were read into is one iovec."""
    out: list[tuple[int, list[memoryview]]] = []
    cur: list[memoryview] = []
    end = -1
    for p0, n in spans:
        gap = (p0 - end) * page_size
        if cur and gap <= BRIDGE_ZEROS and zero(end, p0):
            cur.append(_ZEROS[:gap])
        else:
            cur = []
            out.append((p0 * page_size, cur))
        whole = span(got, p0, n, page_size) if n > 1 else None
        if whole is not None:
            cur.append(whole)
        else:
            cur.extend(got[p] for p in range(p0, p0 + n))
        end = p0 + n
    return out


def _pwrite_parts(fd: int, offset: int, data: bytes | memoryview | list[memoryview]) -> None:
    if not isinstance(data, list):
        pwrite_all(fd, offset, data)
        return
    for i in range(0, len(data), IOV_MAX):
        parts = data[i:i + IOV_MAX]
        want = sum(len(d) for d in parts)
        done = os.pwritev(fd, parts, offset)
        if done < want:  # short: the rest one buffer at a time
            pwrite_all(fd, offset + done, memoryview(b"".join(parts))[done:])
        offset += want


#: where a store of no --store directory keeps its unnamed files
TEMP_DIR = "/var/tmp"


def _unnamed_file(directory: str, region: str) -> int:
    """A new file with no name in ``directory``'s file system: O_TMPFILE, or
    where that is not supported a file created and unlinked at once (in a
    directory of its own, removed at once too)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        return os.open(directory, flags | os.O_TMPFILE, PRIVATE)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise StoreError(f"temporary local store in {directory}: {e.strerror}") from None
    where = tempfile.mkdtemp(prefix="memfs-store-", dir=directory)
    try:
        path = os.path.join(where, f"{region}.pages")
        fd = create_new(path, PRIVATE, flags)
        os.unlink(path)
        return fd
    finally:
        shutil.rmtree(where, ignore_errors=True)


class LocalStore:
    def __init__(self, directory: str | None = None, resume: bool = False) -> None:
        """``resume``: the store files may hold pages of this same mount
        (a restarted daemon); otherwise one that holds pages is refused."""
        self.resume = resume
        if directory is None:
            self.directory = TEMP_DIR
            self._owned = True
        else:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.directory = directory
            self._owned = False
        self._fds: dict[str, int] = {}

    def _fd(self, region: str) -> int:
        return self._fds[region]

    def open_region(self, region: str, size: int) -> None:
        """Open (or create, sparse) the region's page file, never truncating it."""
        if self._owned:
            fd = _unnamed_file(self.directory, region)
            try:
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
            self._fds[region] = fd
            return
        path = os.path.join(self.directory, f"{region}.pages")
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            fd = create_new(path, PRIVATE, flags)
        except FileExistsError:
            try:
                fd = os.open(path, flags | os.O_NOFOLLOW)
            except OSError as e:
                raise StoreError(f"local store {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"local store {path} is not a regular file")
            if st.st_size and not self.resume:
                raise StoreError(f"local store {path} holds the pages of another mount; "
                                 "continue that mount with --resume STATE, or remove the file")
            if st.st_size > size:
                raise StoreError(f"local store {path} is larger ({st.st_size} bytes) than "
                                 f"region {region} ({size} bytes)")
            if st.st_size < size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fds[region] = fd

    def _pread(self, fd: int, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        if pread_into(fd, offset, memoryview(buf)) != length:
            raise OSError(f"local store short read at {offset}")
        return bytes(buf)

    async def write(self, region: str, offset: int, data: bytes | memoryview) -> None:
        """A guest write: kept whole, or OSError (ENOSPC) with nothing changed.

        A small write (the kernel's write-back of a few pages) is done on the
        loop: into the page cache it takes microseconds, a thread hand-off
        about 100 µs, and an fsync of the region with the guest stopped waits
        for every one of them (the downtime of a migration from a source
        mount).  The trim keeps the store's dirty pages few, so it does not
        block on write-back throttling."""
        if len(data) <= _INLINE_WRITE:
            _reserve_and_write(self._fd(region), offset, data)
            return
        await trio.to_thread.run_sync(_reserve_and_write, self._fd(region), offset, data)

    async def write_many(self, region: str,
                         items: list[tuple[int, bytes | memoryview | list[memoryview]]]) -> None:
        """Several writes in one thread hop: a hop costs more than a pwrite.
        A few pages (a demand fault's) are written on the loop, as ``write``
        does: into the page cache that is microseconds, a hop ~100 µs.  A
        list of buffers is one write of their concatenation (pwritev: the
        fetched pages are not copied into one buffer first)."""
        fd = self._fd(region)
        if sum(_length(d) for _, d in items) <= _INLINE_WRITE:
            for offset, data in items:
                _pwrite_parts(fd, offset, data)
            return

        def work() -> None:
            for offset, data in items:
                _pwrite_parts(fd, offset, data)
        await trio.to_thread.run_sync(work)

    async def read(self, region: str, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(self._pread, self._fd(region), offset, length)

    async def read_many(self, region: str, items: list[tuple[int, int]]) -> list[bytes]:
        fd = self._fd(region)
        cached = [nowait_pread(fd, off, n) for off, n in items]
        if all(c is not None for c in cached):
            return cached  # type: ignore[return-value]
        return await trio.to_thread.run_sync(
            lambda: [self._pread(fd, off, n) for off, n in items])

    async def read_into(self, region: str, items: list[tuple[int, memoryview]]) -> None:
        """Fill each view from its offset, straight into the buffer that
        answers the READ (no bytes object per stretch).  What the page cache
        holds is read on the loop (RWF_NOWAIT); the rest in one thread hop."""
        fd = self._fd(region)
        rest: list[tuple[int, memoryview]] = [] if _NOWAIT else items
        for off, view in items if _NOWAIT else ():
            try:
                n = os.preadv(fd, [view], off, _NOWAIT)
            except OSError:  # EAGAIN (not cached), EOPNOTSUPP: in the thread
                n = 0
            if n != len(view):
                rest.append((off + n, view[n:]))
        if not rest:
            return

        def work() -> None:
            for off, view in rest:
                if pread_into(fd, off, view) != len(view):
                    raise OSError(f"local store short read at {off}")
        await trio.to_thread.run_sync(work)

    def trim(self) -> None:
        """Write back and drop the store's pages from the page cache: the
        region file's page cache already holds them (blocking: run in a
        thread).  Reads of the store are rare (after the kernel evicted a
        page), so one copy in host memory is the right trade."""
        for fd in list(self._fds.values()):
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # closed meanwhile, or a file system without it

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
