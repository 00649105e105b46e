"""File back end: a regular file or block device.

Blocking I/O never runs on the trio loop.  A read-only disk is read with
O_DIRECT through Linux AIO (memfs.disks.direct): no thread, no second copy
of the volume in the page cache; where O_DIRECT is refused (tmpfs), or for a
writable disk, reads and writes go through ``trio.to_thread`` so that one
slow call does not stall every FUSE request.
Only regular files and block devices are disks: anything else (a FIFO, a
socket, a character device, a directory) is refused at open, before it is
opened for real, because opening a FIFO blocks until a writer comes and
opening a device may have side effects.
"""

from __future__ import annotations

import errno
import os
import stat

import trio

from ..fileio import nowait_pread, pread_into, pwrite_all
from .base import Disk, DiskError, DiskURI
from .direct import DirectReader


class FileDisk(Disk):
    def __init__(self, uri: str, fd: int, size: int, writable: bool) -> None:
        self.uri = uri
        self._fd = fd
        self.size = size
        self._writable = writable
        self._limiter = trio.CapacityLimiter(16)
        #: reads with no thread hand-off (O_DIRECT + AIO); a read-only disk only
        self._direct = None if writable else DirectReader.open(fd)

    @classmethod
    async def open(cls, parsed: DiskURI, *, writable: bool = False,
                   create_size: int | None = None) -> "FileDisk":
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            st = os.stat(parsed.path)
        except FileNotFoundError:
            if not (writable and create_size is not None):
                raise DiskError(f"{parsed.uri}: cannot open: No such file or directory") from None
            # created here, and only here: O_EXCL never follows a (dangling) link
            flags |= os.O_CREAT | os.O_EXCL
        except OSError as e:
            raise DiskError(f"{parsed.uri}: cannot open: {e.strerror or e}") from None
        else:
            _check_kind(parsed.uri, st.st_mode)
        # O_NONBLOCK: should a FIFO have been swapped in since the stat, the
        # open returns at once and the fstat below refuses it.
        flags |= os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = await trio.to_thread.run_sync(os.open, parsed.path, flags, 0o600)
        except OSError as e:
            raise DiskError(f"{parsed.uri}: cannot open: {e.strerror or e}") from None
        try:
            _check_kind(parsed.uri, os.fstat(fd).st_mode)
            os.set_blocking(fd, True)
            size = os.lseek(fd, 0, os.SEEK_END)
            if create_size is not None and size < create_size:
                os.ftruncate(fd, create_size)
                size = create_size
        except OSError as e:
            os.close(fd)
            raise DiskError(f"{parsed.uri}: {e.strerror or e}") from None
        except DiskError:
            os.close(fd)
            raise
        return cls(parsed.uri, fd, size, writable)

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)  # one buffer, no copy of it
        if len(data) == length:
            return data
        buf = bytearray(length)  # a short read: finish it (or say how short)
        done = pread_into(self._fd, offset, memoryview(buf))
        if done != length:
            raise DiskError(f"{self.uri}: short read at {offset}: {done} of {length} bytes "
                            f"(disk size {self.size})")
        return bytes(buf)

    async def read(self, offset: int, length: int, *, deadline: float | None = None) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"{self.uri}: read of {length} bytes at {offset} is beyond "
                            f"the end ({self.size} bytes)")
        if self._fd < 0:
            raise DiskError(f"{self.uri}: disk is closed")
        direct = self._direct
        if direct is not None and direct.fits(offset, length):
            got, res = await direct.read(offset, length)
            if res == length:
                return got  # type: ignore[return-value]  # a view of a large read
            if res < 0 and res != -errno.EINVAL:
                raise DiskError(f"{self.uri}: read at {offset}: {os.strerror(-res)}")
            if res == -errno.EINVAL:  # this file refuses O_DIRECT after all
                self._direct = None
            # short (the end of the file): the buffered read below says how short
        data = nowait_pread(self._fd, offset, length)
        if data is not None:
            return data
        try:
            async with self._limiter:
                return await trio.to_thread.run_sync(self._pread, offset, length)
        except OSError as e:
            raise DiskError(f"{self.uri}: read at {offset}: {e.strerror}") from None

    def _pwrite(self, offset: int, data: bytes | memoryview) -> None:
        pwrite_all(self._fd, offset, data)
        self.size = max(self.size, offset + len(data))

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if not self._writable:
            raise DiskError(f"{self.uri}: opened read-only")
        if self._fd < 0:
            raise DiskError(f"{self.uri}: disk is closed")
        try:
            async with self._limiter:
                await trio.to_thread.run_sync(self._pwrite, offset, data)
        except OSError as e:
            raise DiskError(f"{self.uri}: write at {offset}: {e.strerror}") from None

    async def write_many(self, items: list[tuple[int, bytes | memoryview]]) -> None:
        """All in one thread hop: a hop costs more than a cached pwrite."""
        if not self._writable:
            raise DiskError(f"{self.uri}: opened read-only")

        def work() -> None:
            for offset, data in items:
                self._pwrite(offset, data)
        try:
            async with self._limiter:
                await trio.to_thread.run_sync(work)
        except OSError as e:
            raise DiskError(f"{self.uri}: write: {e.strerror}") from None

    async def flush(self) -> None:
        if self._writable:
            try:
                await trio.to_thread.run_sync(os.fsync, self._fd)
            except OSError as e:
                raise DiskError(f"{self.uri}: fsync: {e.strerror}") from None

    def stats(self) -> dict[str, int]:
        return dict(self._direct.stats) if self._direct is not None else {}

    async def drop_cache(self) -> None:
        if self._fd >= 0:
            await trio.to_thread.run_sync(os.posix_fadvise, self._fd, 0, 0,
                                          os.POSIX_FADV_DONTNEED)

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        if self._direct is not None:
            self._direct.close()
            self._direct = None


#: what a path that is not a disk is, for the one-line refusal
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory"))


def _check_kind(uri: str, mode: int) -> None:
    """Refuse anything but a regular file or a block device."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), f"of file type {mode >> 12:o}")
    raise DiskError(f"{uri}: is {kind}, not a disk (a disk is a regular file or a block device)")
