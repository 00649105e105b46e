"""A FUSE connection that outlives its daemon: the holder's and the daemon's side.

The holder (memfs.supervisor) opens /dev/fuse, mount(2)s it itself
(``fd=N,rootmode=40000,user_id=0,group_id=0``, type fuse.memfs) and keeps
the descriptor for as long as the mount lives.  A FUSE connection ends when
the last descriptor of it is closed, so a daemon that dies (SIGKILL, a
crash, the OOM killer) leaves readers blocked, not SIGBUSed, until another
daemon answers them.

Getting past libfuse's INIT.  pyfuse3 serves a descriptor that someone else
mounted when given ``/dev/fd/N`` as mount point (libfuse then mounts and
unmounts nothing).  But a libfuse session answers everything with EIO until
it has processed an INIT, and the kernel sends INIT once per connection
(libfuse RFC PR 1219 wants an API for exactly this).  So the holder reads
the kernel's INIT itself, right after mount(2), and keeps the bytes.  Every
daemon, the first included, is started on one end ``S`` of a
SOCK_SEQPACKET socketpair into which that INIT has been written: libfuse's
first read() of ``/dev/fd/S`` returns it as one message, as /dev/fuse
would.  libfuse calls ``Operations.init()`` while handling it, before it
writes the reply; there ``on_init`` dup2()s the real /dev/fuse descriptor
onto ``S``.  From then on libfuse reads and writes the real connection with
no relay and no cost per request.  The INIT reply goes to the kernel too:
for the first daemon it carries the unique of the kernel's pending INIT and
completes it; for a successor that unique is long answered, the kernel
rejects the reply with ENOENT, which libfuse ignores.  The negotiated
parameters stay those of the first INIT (a successor is started with the
same options, and libfuse checks max_read against the INIT it sees).

Why FUSE_NOTIFY_RESEND is sent where it is.  Requests the dead daemon had
read but not answered sit in the kernel's processing list; nobody would
ever answer them.  Writing the 16-byte notification ``{len=16, error=7
(FUSE_NOTIFY_RESEND), unique=0}`` (Linux >= 6.9) moves them back to the
pending queue (their unique gains bit 63; libfuse echoes it).  It is
written in ``on_init``, right after the dup2: the old daemon is dead by
then (the supervisor waited for it), and this daemon has not read a single
request yet, so nothing is requeued that the new daemon is already
processing (sent later, a request could be processed twice).  It is not
sent by the first daemon of a connection: the only request read before it
is the INIT, which the holder took and which must not come back.

Resent requests may have been applied once already by the dead daemon;
every memfs request is idempotent (a WRITE writes the same bytes again), and
inode numbers and file handles are fixed functions of the region list, so
handles issued by the dead daemon mean the same to its successor.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct

log = logging.getLogger("memfs.takeover")

FUSE_INIT = 26
IN_HEADER = struct.Struct("<IIQQIIIHH")   # len, opcode, unique, nodeid, uid, gid, pid, ..
NOTIFY_RESEND = struct.pack("<IiQ", 16, 7, 0)
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


class TakeoverError(Exception):
    """The held connection cannot be set up; the message says why."""


def kernel_options(*, allow_other: bool = False, max_read: int | None = None,
                   fd: int) -> str:
    """The mount(2) data a FUSE mount of memfs gets (what libfuse would pass)."""
    opts = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
            f"group_id={os.getgid()}", "default_permissions"]
    if allow_other:
        opts.append("allow_other")
    if max_read:
        opts.append(f"max_read={max_read}")
    return ",".join(opts)


def mount_fuse(mountpoint: str, *, allow_other: bool = False,
               max_read: int | None = None) -> int:
    """Open /dev/fuse and mount it on ``mountpoint``; return the descriptor."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise TakeoverError(f"cannot open /dev/fuse: {e.strerror}") from None
    data = kernel_options(allow_other=allow_other, max_read=max_read, fd=fd)
    if _libc.mount(b"memfs", os.fsencode(mountpoint), b"fuse.memfs",
                   ctypes.c_ulong(MS_NOSUID | MS_NODEV), data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise TakeoverError(f"cannot mount {mountpoint}: {os.strerror(err)}")
    return fd


def read_init(fd: int) -> bytes:
    """The kernel's INIT, queued by mount(2): read it and keep it."""
    msg = os.read(fd, 1 << 17)
    if len(msg) < IN_HEADER.size or IN_HEADER.unpack_from(msg)[1] != FUSE_INIT:
        raise TakeoverError(f"the first FUSE message is not an INIT ({len(msg)} bytes)")
    return msg


def connection_alive(fd: int, timeout: float = 0.0) -> bool:
    """False once the connection is gone (unmounted or aborted): /dev/fuse
    then polls POLLERR.  Asks for no event, so pending requests (POLLIN)
    never wake the holder."""
    p = select.poll()
    p.register(fd, 0)
    return not p.poll(int(timeout * 1000))


def detach(mountpoint: str) -> bool:
    """Lazy unmount (what libfuse does for root); False if it was not mounted."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            log.warning("cannot detach %s: %s", mountpoint, os.strerror(err))
        return False
    return True


def unmount(mountpoint: str) -> int:
    """Plain unmount: 0, or the errno (EBUSY while a process uses the mount)."""
    if _libc.umount2(os.fsencode(mountpoint), 0) != 0:
        return ctypes.get_errno()
    return 0


class Takeover:
    """The daemon's side: serve the held connection ``fuse_fd`` through
    libfuse (give ``target`` to pyfuse3.init, ``on_init`` to the Operations)."""

    def __init__(self, fuse_fd: int, init_msg: bytes, resend: bool) -> None:
        self.fuse_fd = fuse_fd
        self.resend = resend
        ours, self._feed = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._feed.send(init_msg)
        self.fd = ours.detach()
        os.set_inheritable(self.fd, False)
        self.target = f"/dev/fd/{self.fd}"
        self.adopted = False

    def on_init(self) -> None:
        """Called by libfuse inside INIT, before its reply: switch the
        session from the socketpair to the real connection, then have the
        kernel resend what a dead predecessor had taken."""
        try:
            os.dup2(self.fuse_fd, self.fd, inheritable=False)
            os.close(self.fuse_fd)
            self._feed.close()
            self.adopted = True
            if self.resend:
                os.write(self.fd, NOTIFY_RESEND)
                log.info("FUSE connection taken over; unanswered requests resent")
            else:
                log.info("FUSE connection taken over (first daemon)")
        except BaseException:  # libfuse cannot take an exception here: die, be restarted
            log.exception("taking over the FUSE connection failed")
            os._exit(70)
