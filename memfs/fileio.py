"""File I/O shared by every layer: whole-buffer pread/pwrite (the file disk,
the local store and capture; each turns a short read into its own error), and
the one way memfs creates files.

Creating files (DESIGN.md invariant 8): memfs often runs as root and writes
into directories that other users may be able to write (the page map's, the
trace's).  So every file it creates is made with ``O_CREAT | O_EXCL |
O_NOFOLLOW`` (a name planted in advance, or a symbolic link, makes the create
fail instead of redirecting it), gets its mode explicitly (0600 unless the
caller says otherwise: the umask plays no part), and is written under a
random temporary name in the target's own directory, fsynced, and renamed
over the target: a reader sees the old file or the new one, never a torn one.
The directory is opened once and every step is relative to it, so that
swapping a path component half-way cannot move the write elsewhere.  A
target that is a symbolic link (or not a regular file) is refused, never
replaced or followed.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import stat
from typing import Iterable

#: the mode of every file memfs creates unless an option says otherwise
PRIVATE = 0o600
#: the most buffers one preadv/pwritev takes (Linux: 1024)
IOV_MAX = os.sysconf("SC_IOV_MAX")
_CREATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_NOWAIT_MAX = 256 << 10  # larger reads go to a thread even when cached


def pread_into(fd: int, offset: int, into: memoryview) -> int:
    """Fill ``into`` from ``offset``; return how much was read (less at EOF)."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pwrite_all(fd: int, offset: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def nowait_pread(fd: int, offset: int, length: int) -> bytes | None:
    """The bytes if the page cache holds all of them, else None.

    A thread hand-off costs more than a cached pread here (about 120 µs
    against a few µs), so a read that cannot block is done on the loop;
    RWF_NOWAIT makes the kernel say EAGAIN instead of going to the disk.
    """
    if length > _NOWAIT_MAX or not hasattr(os, "RWF_NOWAIT"):
        return None
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError:  # EAGAIN, or EOPNOTSUPP on filesystems without it
        return None
    return bytes(buf) if n == length else None


def _refuse_special(name: str, dfd: int, path: str) -> None:
    """Refuse to replace a symbolic link or a non-regular file at ``path``."""
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "is a symbolic link (memfs never writes through one)", path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "exists and is not a regular file", path)


def create_new(path: str | os.PathLike[str], mode: int = PRIVATE, flags: int = os.O_RDWR,
               dir_fd: int | None = None) -> int:
    """Create ``path``, which must not exist (not even as a symbolic link),
    with exactly ``mode``; return its descriptor."""
    fd = os.open(path, flags | _CREATE, mode & 0o777, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask narrows the open's mode: set it exactly
    except BaseException:
        os.close(fd)
        raise
    return fd


def tmp_name(name: str) -> str:
    """A hidden temporary name beside ``name`` with a random suffix."""
    return f".{name[:200]}.{secrets.token_hex(8)}.tmp"


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview], *,
                 mode: int = PRIVATE) -> None:
    """Replace (or create) ``path`` with the concatenated ``chunks``: a crash
    leaves the old file or the new one, never a torn one; an error (ENOSPC,
    EIO) leaves the old one and no temporary file.  Raises OSError."""
    path = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(path))
    if not name:
        raise OSError(errno.EISDIR, "is a directory", path)
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _refuse_special(name, dfd, path)
        for _ in range(16):
            tmp = tmp_name(name)
            try:
                fd = create_new(tmp, mode, os.O_WRONLY, dir_fd=dfd)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, "no free temporary name", path)
        try:
            with io.FileIO(fd, "wb", closefd=True) as raw, \
                    io.BufferedWriter(raw, 1 << 20) as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(fd)
            _refuse_special(name, dfd, path)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        os.fsync(dfd)  # the rename itself is durable
    finally:
        os.close(dfd)
