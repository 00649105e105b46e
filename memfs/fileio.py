"""Whole-buffer pread/pwrite on file descriptors, shared by the file disk,
the local store and capture (each turns a short read into its own error)."""

from __future__ import annotations

import os

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
