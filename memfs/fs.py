"""The pyfuse3 Operations: a thin adapter from FUSE requests to PageServer.

Layout of a mount::

    /ram0, /ram1, …          one file per region (page cache kept, no direct_io)
    /.memfs/                 stats files (direct_io: never stale), pid,
                             last_error, and the writable ``control`` file

Only FUSEError may leave a handler (DESIGN.md invariant 7): every handler
goes through ``_guard``, which turns anything unexpected into EIO and logs it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
import zlib
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3

from .control import error_text
from .pages import PageIOError, PageServer
from .stats import Stats, file_text

log = logging.getLogger("memfs.fs")

ROOT = pyfuse3.ROOT_INODE
META_DIR = ROOT + 1
REGION_BASE = 16
META_BASE = 1 << 20
META_NAME = ".memfs"
SPECIAL_FILES = ("control", "last_error", "pid", "read_latency_us", "stats.json")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _guard(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except PageIOError as e:
            log.error("%s failed: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("BUG: unexpected error in %s; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


class MemFS(pyfuse3.Operations):
    """Region files and the ``.memfs`` directory."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, pages: PageServer, stats: Stats,
                 control: Callable[[str], Awaitable[Callable[[], None] | None]],
                 *, mode: int = 0o600) -> None:
        super().__init__()
        self.pages = pages
        self.stats = stats
        self.control = control
        self.mode = mode
        self.last_error = ""
        self.mtime_ns = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.regions = list(pages.sizes)
        self.region_inode = {n: REGION_BASE + i for i, n in enumerate(self.regions)}
        self.inode_region = {i: n for n, i in self.region_inode.items()}
        self.meta_inode: dict[str, int] = {}
        self.inode_meta: dict[int, str] = {}
        self._open_meta: dict[int, bytes] = {}
        self._next_fh = 1
        #: control fh -> what a command asked to run once its writer closes
        self._after_release: dict[int, Callable[[], None]] = {}

    #: called inside libfuse's INIT handling, before the reply is written:
    #: memfs.takeover adopts a held FUSE connection here
    on_init: Callable[[], None] | None = None

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    # -- names ------------------------------------------------------------------

    def meta_names(self) -> list[str]:
        names = [k for k, v in self.stats.snapshot().items() if not isinstance(v, dict)]
        names.extend(SPECIAL_FILES)
        for n in sorted(set(names)):
            if n not in self.meta_inode:
                # a function of the name: a successor daemon (memfs.takeover)
                # must give the inodes the kernel already knows the same meaning
                ino = META_BASE + zlib.crc32(n.encode()) % (1 << 30)
                while ino in self.inode_meta:
                    ino += 1
                self.meta_inode[n] = ino
                self.inode_meta[ino] = n
        return sorted(set(names))

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode >= META_BASE and inode not in self.inode_meta:
            self.meta_names()  # known to an earlier daemon
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.st_blksize = 4096
        a.attr_timeout = a.entry_timeout = 3600.0
        if inode in (ROOT, META_DIR):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif inode in self.inode_region:
            a.st_mode = stat.S_IFREG | self.mode
            a.st_size = self.pages.sizes[self.inode_region[inode]]
            a.st_nlink = 1
        elif inode in self.inode_meta:
            name = self.inode_meta[inode]
            a.st_mode = stat.S_IFREG | (0o600 if name == "control" else 0o444)
            a.st_size = 0 if name == "control" else 4096
            a.st_nlink = 1
            a.attr_timeout = a.entry_timeout = 1.0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_blocks = (a.st_size + 511) // 512
        return a

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(name)
        if parent_inode == ROOT:
            if n == META_NAME:
                return self._attr(META_DIR)
            if n in self.region_inode:
                return self._attr(self.region_inode[n])
        elif parent_inode == META_DIR and n in self.meta_names():
            return self._attr(self.meta_inode[n])
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_guard
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            size = self._attr(inode).st_size
            if inode not in self.inode_region or attr.st_size != size:
                log.warning("refused to resize inode %d to %d bytes", inode, attr.st_size)
                raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)  # times: accepted and ignored

    @_guard
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode not in (ROOT, META_DIR):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == ROOT:
            entries = [(META_NAME, META_DIR)] + [(n, self.region_inode[n]) for n in self.regions]
        else:
            entries = [(n, self.meta_inode[n]) for n in self.meta_names()]
        for i, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(ino), i):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    @_guard
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(self.pages.sizes.values()) // 4096
        s.f_namemax = 255
        return s

    # -- files ----------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode in self.inode_region:
            if flags & os.O_TRUNC:
                # atomic_o_trunc: the kernel drops the page cache (dirty guest
                # pages included) once an O_TRUNC open succeeds; a region has
                # a fixed size and is never emptied
                log.warning("refused open(O_TRUNC) of region %s", self.inode_region[inode])
                raise pyfuse3.FUSEError(errno.EPERM)
            # keep_cache: reopening must not drop pages the guest may have dirtied
            return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)
        if inode >= META_BASE and inode not in self.inode_meta:
            self.meta_names()  # known to an earlier daemon
        if inode not in self.inode_meta:
            raise pyfuse3.FUSEError(errno.ENOENT)
        name = self.inode_meta[inode]
        if flags & os.O_ACCMODE != os.O_RDONLY and name != "control":
            raise pyfuse3.FUSEError(errno.EACCES)
        if flags & os.O_ACCMODE != os.O_RDONLY and ctx is not None \
                and ctx.uid not in (0, self.uid):
            # commands only from root or the mount's owner, whatever the mode bits
            # (ctx is None only for a call from this process, in tests)
            log.warning("refused to open control for writing to uid %d (pid %d)",
                        ctx.uid, ctx.pid)
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = (self._next_fh << 32) | inode  # names its file, for a successor
        self._next_fh += 1
        # The content is fixed at open so that a reader sees one consistent
        # value even across several READs; direct_io so it is never cached.
        self._open_meta[fh] = self._meta_content(name).encode()
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

    def _meta_data(self, fh: int) -> bytes | None:
        """An open ``.memfs`` file's content; one opened under an earlier
        daemon (memfs.takeover) is read afresh: its handle names its inode."""
        data = self._open_meta.get(fh)
        if data is None and fh >> 32:
            self.meta_names()
            name = self.inode_meta.get(fh & 0xFFFFFFFF)
            if name is not None:
                data = self._open_meta[fh] = self._meta_content(name).encode()
        return data

    def _meta_content(self, name: str) -> str:
        if name == "control":
            return ""
        if name == "last_error":
            return self.last_error + ("\n" if self.last_error else "")
        if name == "pid":
            return f"{os.getpid()}\n"
        return file_text(self.stats.snapshot(), name)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self.inode_region:
            return await self.pages.read(self.inode_region[fh], off, size)
        data = self._meta_data(fh)
        if data is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return data[off:off + size]

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self.inode_region:
            return await self.pages.write(self.inode_region[fh], off, buf)
        if self._meta_data(fh) is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for line in buf.decode(errors="replace").splitlines():
            if line.strip():
                try:
                    after = await self.control(line.strip())
                except Exception as e:  # reported to the writer, kept for `memfs`
                    self.last_error = error_text(line, e)
                    log.error("control command failed: %s", self.last_error)
                    raise pyfuse3.FUSEError(errno.EINVAL) from None
                self.last_error = ""
                if after is not None:
                    self._after_release[fh] = after
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        self._open_meta.pop(fh, None)
        after = self._after_release.pop(fh, None)
        if after is not None:
            try:
                after()
            except Exception:  # only FUSEError may leave a handler
                log.exception("BUG: after-release action of a control command failed")

    async def forget(self, inode_list: Any) -> None:
        pass
