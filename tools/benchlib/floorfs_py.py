#!/usr/bin/env python3
"""floorfs in Python: the least a pyfuse3 + trio daemon can do for a page
fault, the twin of floorfs.c (one file "f"; a READ answered from memory,
or by one O_DIRECT pread of BACKING done on the loop: no thread hop, no
checksum, no bookkeeping).  tools/bench-fuse-floor runs both.

    floorfs_py.py MNT SIZE [BACKING]     (foreground; unmount to stop)
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys

import pyfuse3
import trio

FILE_INO = 2
MAX_READ = 1 << 20


class FloorOps(pyfuse3.Operations):
    def __init__(self, size: int, backing: int | None) -> None:
        super().__init__()
        self.size, self.backing = size, backing
        self.buf = mmap.mmap(-1, MAX_READ)   # page-aligned, as O_DIRECT wants
        self.buf.write(b"\xa5" * MAX_READ)
        self.view = memoryview(self.buf)

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, self.size
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=FILE_INO, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        n = max(0, min(size, MAX_READ, self.size - off))
        if self.backing is not None and n:
            try:
                got = os.preadv(self.backing, [self.view[:n]], off)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            if got != n:
                raise pyfuse3.FUSEError(errno.EIO)
        return self.view[:n].tobytes()


def main() -> int:
    mnt, size = sys.argv[1], int(sys.argv[2], 0)
    backing = os.open(sys.argv[3], os.O_RDONLY | os.O_DIRECT) if len(sys.argv) > 3 else None
    pyfuse3.init(FloorOps(size, backing), mnt, {"fsname=floorfs_py"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
