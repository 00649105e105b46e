"""The local store: pages the destination owns (guest writes, completed fetches).

One sparse file per region, page i at byte i * page_size.  It is a real file
on a local disk so that the pages survive page-cache eviction of the FUSE
file; which pages it holds is recorded in the page map (state LOCAL).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import trio

from .fileio import nowait_pread, pread_into, pwrite_all


class LocalStore:
    def __init__(self, directory: str | None = None) -> None:
        if directory is None:
            self.directory = tempfile.mkdtemp(prefix="memfs-store-", dir="/var/tmp")
            self._owned = True
        else:
            os.makedirs(directory, exist_ok=True)
            self.directory = directory
            self._owned = False
        self._fds: dict[str, int] = {}

    def _fd(self, region: str) -> int:
        fd = self._fds.get(region)
        if fd is None:
            path = os.path.join(self.directory, f"{region}.pages")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._fds[region] = fd
        return fd

    def open_region(self, region: str, size: int) -> None:
        """Create the region's (empty, sparse) page file."""
        os.ftruncate(self._fd(region), size)

    def _pread(self, fd: int, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        if pread_into(fd, offset, memoryview(buf)) != length:
            raise OSError(f"local store short read at {offset}")
        return bytes(buf)

    async def write(self, region: str, offset: int, data: bytes | memoryview) -> None:
        await trio.to_thread.run_sync(pwrite_all, self._fd(region), offset, data)

    async def write_many(self, region: str,
                         items: list[tuple[int, bytes | memoryview]]) -> None:
        """Several writes in one thread hop: a hop costs more than a pwrite."""
        fd = self._fd(region)

        def work() -> None:
            for offset, data in items:
                pwrite_all(fd, offset, data)
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
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)
