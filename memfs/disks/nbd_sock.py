"""The socket under an NBD connection, used without trio's stream layer.

trio's ``SocketStream`` yields to the scheduler after every send and every
receive, even when the kernel took or had the bytes at once (a checkpoint
per call).  A 4 KiB read then costs the loop several passes: the writer task
woken, its send, its checkpoint, the reader's receive, its checkpoint, the
caller.  On a real socket the connection calls the non-blocking socket
itself and waits (``wait_readable``) only when the kernel has nothing yet:
one pass per reply.  Error texts are trio's, so logs and ``DiskError``
messages read the same on both paths.  Other streams (trio's memory streams
in tests) keep the plain :class:`nbd_proto.Reader`.

A caller alone on the connection reads its own reply (:meth:`SocketReader.take_reply`):
one ``readv`` into the reply's header and the request's buffer, checked in one step;
anything else it read stays buffered, in order, for the general parse.  Meanwhile
the reader task waits aside for a hang-up only (:meth:`SocketReader.hangup`, an
epoll of its own that reports nothing else), so the socket's readiness wakes the
caller alone and neither task has to move the other out of the way.
"""

from __future__ import annotations

import errno
import os
import select
import struct

import trio

from . import nbd_proto as p

#: socket errors that mean "closed here", as trio maps them
_CLOSED = {errno.EBADF, errno.ENOTSOCK}
#: replies parsed from the kernel's buffer without a wait before the reader
#: lets the other tasks run (a cancel point too)
_SPIN = 64
#: a payload still missing at least this much is received in place
INTO_MIN = 64 << 10
#: the reader's receive buffer: reused, because a fresh bytes object of this
#: size for every reply (os.read) is an mmap and munmap each time (~15 us)
CHUNK = 256 << 10
#: the longest read whose caller may read its own reply (one readv takes it whole)
OWN_MAX = 64 << 10
#: take_reply's answers: the reply is in the request; nothing there yet; anything
#: else (kept in the buffer, or an error kept for the next read): the reader parses
TOOK, NOTHING, OTHER = 1, 0, -1

_SIMPLE_HEAD = struct.Struct(">IIQ")       # magic, error, cookie
_DATA_HEAD = struct.Struct(">IHHQIQ")      # magic, flags, type, cookie, length, data offset


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under ``stream`` if it is a plain socket stream."""
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def lost(e: OSError) -> p.NBDConnectionLost:
    """trio's words for a failed socket call, as the connection reports them."""
    if e.errno in _CLOSED:
        return p.NBDConnectionLost("connection lost: this socket was already closed")
    return p.NBDConnectionLost(f"connection lost: socket connection broken: {e}")


def make_reader(stream: trio.abc.Stream) -> p.Reader:
    sock = socket_of(stream)
    return p.Reader(stream) if sock is None else SocketReader(stream, sock)


class SocketReader(p.Reader):
    """:class:`nbd_proto.Reader` on the bare non-blocking socket."""

    def __init__(self, stream: trio.abc.ReceiveStream, sock: trio.socket.SocketType) -> None:
        super().__init__(stream)
        self._sock = sock
        self._spins = 0
        #: a failure met by take_reply, raised by the reader's next read
        self._failed: p.NBDConnectionLost | None = None
        self._head = bytearray(_DATA_HEAD.size)
        self._watch: select.epoll | None = None
        self._chunk = memoryview(bytearray(CHUNK))

    def _fd(self) -> int:
        if self._failed is not None:
            raise self._failed
        fd = self._sock.fileno()
        if fd < 0:  # closed by the connection: never read a reused number
            raise p.NBDConnectionLost("connection lost: this socket was already closed")
        return fd

    async def _wait(self) -> None:
        self._spins = 0
        try:
            await trio.lowlevel.wait_readable(self._sock)
        except trio.ClosedResourceError:
            raise p.NBDConnectionLost("connection lost: this socket was already closed") \
                from None

    async def hangup(self) -> None:
        """Until the server hangs up or the socket fails (not when bytes
        come: those are whoever reads the socket's).  Bytes a server sends
        unasked are read, and refused, with the next request."""
        if self._watch is None:
            self._watch = select.epoll()
            self._watch.register(self._fd(), select.EPOLLRDHUP)  # ERR, HUP: always
        try:
            await trio.lowlevel.wait_readable(self._watch.fileno())
        except trio.ClosedResourceError:
            raise p.NBDConnectionLost("connection lost: this socket was already closed") \
                from None

    def close(self) -> None:
        """Close the hang-up watch (the socket is the stream's to close)."""
        if self._watch is not None:
            trio.lowlevel.notify_closing(self._watch.fileno())
            self._watch.close()
            self._watch = None

    async def _got(self, n: int) -> None:
        if not n:
            raise p.NBDConnectionLost("server closed the connection")
        self.received += n
        self._spins += 1
        if self._spins >= _SPIN:
            self._spins = 0
            await trio.lowlevel.checkpoint()

    async def _fill(self, want: int) -> None:
        """Whatever the socket has, up to CHUNK bytes (callers loop for more)."""
        while True:
            try:
                n = os.readv(self._fd(), [self._chunk])
                break
            except BlockingIOError:
                await self._wait()
            except OSError as e:
                raise lost(e) from None
        self._buf += self._chunk[:n]
        await self._got(n)

    async def into(self, view: memoryview) -> None:
        """Fill ``view``: what is buffered, then large remainders straight
        from the socket into place (no intermediate bytes)."""
        n = len(view)
        have = min(n, len(self._buf))
        if have:
            view[:have] = self._buf[:have]
            del self._buf[:have]
        while n - have >= INTO_MIN:
            try:
                k = os.readv(self._fd(), [view[have:]])
            except BlockingIOError:
                await self._wait()
                continue
            except OSError as e:
                raise lost(e) from None
            have += k
            await self._got(k)
        if have < n:
            await super().into(view[have:])

    def take_reply(self, cookie: int, req: p.Request, structured: bool) -> int:
        """Read the reply to ``req`` (a read, the only request in flight) if
        the socket holds it whole: TOOK (``req.buf`` filled, no error),
        NOTHING (no byte yet), else OTHER: every byte read is buffered in
        order (an error, a short or unexpected reply) for the reader's parse.
        Synchronous: nothing is ever half taken when a caller is cancelled."""
        assert req.buf is not None and not self._buf
        size = _DATA_HEAD.size if structured else _SIMPLE_HEAD.size
        head = self._head
        try:
            n = os.readv(self._fd(), [memoryview(head)[:size], req.buf])
        except BlockingIOError:
            return NOTHING
        except OSError as e:
            self._failed = lost(e)
            return OTHER
        except p.NBDConnectionLost:
            return OTHER
        self.received += n
        if n == size + req.length:
            if structured:
                magic, flags, rtype, got, length, off = _DATA_HEAD.unpack_from(head)
                if magic == p.STRUCTURED_REPLY_MAGIC and flags & p.REPLY_FLAG_DONE \
                        and rtype == p.REPLY_TYPE_OFFSET_DATA and got == cookie \
                        and length == req.length + 8 and off == req.offset:
                    return TOOK
            else:
                magic, error, got = _SIMPLE_HEAD.unpack_from(head)
                if magic == p.SIMPLE_REPLY_MAGIC and not error and got == cookie:
                    return TOOK
        self._buf += head[:min(n, size)]
        if n > size:  # moved to the buffer: req.buf is as the reader would find it
            self._buf += memoryview(req.buf)[:n - size]
            req.buf[:n - size] = bytes(n - size)
        return OTHER
