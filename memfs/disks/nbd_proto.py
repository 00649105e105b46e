"""The NBD wire protocol: its numbers, requests and replies, with no policy
(the handshake, which uses them, is in :mod:`nbd_handshake`).

This module speaks doc/proto.md of the NetworkBlockDevice project over any
``trio.abc.Stream`` and nothing else: no sockets, no retries, no timeouts.
That keeps it testable over ``trio.testing`` memory streams against a server
that lies.  Every protocol violation raises :class:`NBDProtocolError` and an
early end of stream :class:`NBDConnectionLost`, both :class:`DiskError`\\ s,
so that nothing else ever reaches a caller.  After either, the stream is
unusable and must be closed (the spec's "hard disconnect").
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

import trio

from .base import DiskError

# Handshake magics and flags.
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPT_REPLY_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

# Option replies.
REP_ACK = 1
REP_INFO = 3
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_NAMES = {
    REP_ERR + 1: "unsupported option", REP_ERR + 2: "forbidden by policy",
    REP_ERR + 3: "invalid", REP_ERR + 4: "not supported on this platform",
    REP_ERR + 5: "TLS required", REP_ERR + 6: "unknown export",
    REP_ERR + 7: "server shutting down", REP_ERR + 8: "block size negotiation required",
    REP_ERR + 9: "request too big",
}

# Information types.
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_CAN_MULTI_CONN = 1 << 8

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect", CMD_FLUSH: "flush"}

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Structured reply chunks.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2
REPLY_TYPE_ERROR_BIT = 1 << 15

# Errors a server may return (NBD numbers, which are Linux errno values).
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
ERRNO_NAMES = {EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL",
               ENOSPC: "ENOSPC", EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP",
               ESHUTDOWN: "ESHUTDOWN"}

#: Default limits (proto.md "Size constraints") when the server advertises none.
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREF_BLOCK = 4096
DEFAULT_MAX_PAYLOAD = 32 << 20
#: The longest option reply or error message we accept; anything longer is a lie.
MAX_OPTION_REPLY = 64 << 10
#: proto.md: an error message "MUST NOT exceed 4096 bytes"; an error chunk is
#: errno (4), message length (2), the message and, for ERROR_OFFSET, an offset (8).
MAX_ERROR_MESSAGE = 4096
MAX_ERROR_CHUNK = 6 + MAX_ERROR_MESSAGE + 8
#: at most one chunk per 512 bytes of a request (plus a few): a server that
#: splits a read into more pieces than sectors is flooding us, not answering
CHUNKS_PER_BYTE = 512
#: the most bytes asked of the socket at once, whatever the caller waits for
MAX_RECEIVE = 4 << 20

_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IQ")          # after the 4-byte magic: error, cookie
_CHUNK = struct.Struct(">HHQI")         # after the magic: flags, type, cookie, length
_DATA_HEAD = struct.Struct(">IHHQIQ")   # magic, flags, type, cookie, length, data offset


class NBDProtocolError(DiskError):
    """The server broke the protocol; the connection must be dropped."""


class NBDConnectionLost(DiskError):
    """The stream ended or failed; requests in flight may be sent again elsewhere."""


def errno_name(err: int) -> str:
    return ERRNO_NAMES.get(err, f"error {err}")


@dataclass
class ExportInfo:
    """What the handshake learnt about the export."""

    size: int
    flags: int
    structured: bool
    min_block: int = DEFAULT_MIN_BLOCK
    pref_block: int = DEFAULT_PREF_BLOCK
    max_payload: int = DEFAULT_MAX_PAYLOAD

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FLUSH)

    @property
    def multi_conn(self) -> bool:
        return bool(self.flags & TFLAG_CAN_MULTI_CONN)


class Reader:
    """Buffered exact reads from a stream: the protocol is all fixed-size fields."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        #: bumped on every byte received, so a caller can tell a stalled peer
        self.received = 0

    async def _fill(self, want: int) -> None:
        try:
            chunk = await self._stream.receive_some(min(max(want, 256 << 10), MAX_RECEIVE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise NBDConnectionLost(f"connection lost: {e or type(e).__name__}") from None
        if not chunk:
            raise NBDConnectionLost("server closed the connection")
        self.received += len(chunk)
        self._buf += chunk

    async def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill(n - len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def into(self, view: memoryview) -> None:
        """Fill ``view`` completely (large payloads skip one copy)."""
        n = len(view)
        have = min(n, len(self._buf))
        view[:have] = self._buf[:have]
        del self._buf[:have]
        while have < n:
            await self._fill(n - have)
            take = min(n - have, len(self._buf))
            view[have:have + take] = self._buf[:take]
            del self._buf[:take]
            have += take

    async def skip(self, n: int) -> None:
        while n:
            chunk = await self.exactly(min(n, 1 << 20))
            n -= len(chunk)


# ---------------------------------------------------------------- transmission

def encode_request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return _REQ.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass
class Request:
    """One command in flight, as the reply reader needs to see it.

    ``buf`` receives a read's data; ``error`` is the server's errno (0: none).
    """

    cmd: int
    offset: int
    length: int
    buf: bytearray | None = None
    error: int = 0
    message: str = ""
    #: disjoint content ranges (start, end) seen in a structured reply, sorted
    #: and merged when they touch, to check cover
    _seen: list[tuple[int, int]] = field(default_factory=list)
    #: structured reply chunks received so far
    chunks: int = 0

    @property
    def max_chunks(self) -> int:
        return 4 + self.length // CHUNKS_PER_BYTE


async def receive_reply(reader: Reader, structured: bool,
                        pending: dict[int, Request]) -> tuple[int, bool]:
    """Read one reply (simple) or one chunk (structured) and apply it.

    Returns ``(cookie, done)``; ``done`` means the request is complete and its
    ``error``/``buf`` are final.  A reply for a cookie not in ``pending``,
    data outside the request, overlaps or a gap at the end are lies.
    """
    if structured:
        if not reader._buf:
            await reader._fill(_DATA_HEAD.size)
        if len(reader._buf) >= _DATA_HEAD.size:
            cookie = await _whole_read_reply(reader, pending)
            if cookie is not None:
                return cookie, True
    (magic,) = struct.unpack(">I", await reader.exactly(4))
    if magic == SIMPLE_REPLY_MAGIC:
        return await _simple_reply(reader, structured, pending), True
    if magic != STRUCTURED_REPLY_MAGIC or not structured:
        raise NBDProtocolError(f"bad reply magic {magic:#x}")
    flags, rtype, cookie, length = _CHUNK.unpack(await reader.exactly(_CHUNK.size))
    req = _lookup(pending, cookie)
    done = bool(flags & REPLY_FLAG_DONE)
    req.chunks += 1
    if req.chunks > req.max_chunks:
        raise NBDProtocolError(f"more than {req.max_chunks} reply chunks for a "
                               f"{CMD_NAMES.get(req.cmd)} of {req.length} bytes")
    if rtype == REPLY_TYPE_NONE:
        if length or not done:
            raise NBDProtocolError("NBD_REPLY_TYPE_NONE chunk with payload or without DONE")
    elif rtype in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
        await _read_chunk(reader, req, rtype, length)
    elif rtype & REPLY_TYPE_ERROR_BIT:
        await _error_chunk(reader, req, length)
    else:
        raise NBDProtocolError(f"unknown structured reply type {rtype}")
    if done and not req.error and req.cmd == CMD_READ:
        _check_covered(req)
    return cookie, done


async def _whole_read_reply(reader: Reader, pending: dict[int, Request]) -> int | None:
    """The usual answer to a read, taken in one step: one OFFSET_DATA chunk
    with DONE holding the whole request, its header already buffered.  Its
    cookie, or None (nothing consumed) for anything else, which the general
    path then reads and checks."""
    magic, flags, rtype, cookie, length, off = _DATA_HEAD.unpack_from(reader._buf)
    if magic != STRUCTURED_REPLY_MAGIC or rtype != REPLY_TYPE_OFFSET_DATA \
            or not flags & REPLY_FLAG_DONE:
        return None
    req = pending.get(cookie)
    if req is None or req.cmd != CMD_READ or req.chunks or off != req.offset \
            or length - 8 != req.length or not req.length:
        return None
    assert req.buf is not None
    del reader._buf[:_DATA_HEAD.size]
    req.chunks = 1
    req._seen.append((off, off + req.length))
    await reader.into(memoryview(req.buf))
    return cookie


async def _simple_reply(reader: Reader, structured: bool, pending: dict[int, Request]) -> int:
    """A simple reply (its magic read): apply it, return its cookie."""
    error, cookie = _SIMPLE.unpack(await reader.exactly(_SIMPLE.size))
    req = _lookup(pending, cookie)
    if structured and req.cmd == CMD_READ and not error:
        raise NBDProtocolError("simple reply with data to a read after structured "
                               "replies were negotiated")
    req.error = error
    if req.cmd == CMD_READ and not error:
        assert req.buf is not None
        await reader.into(memoryview(req.buf))
    return cookie


async def _read_chunk(reader: Reader, req: Request, rtype: int, length: int) -> None:
    """An OFFSET_DATA or OFFSET_HOLE chunk of a read: into its place in ``req.buf``."""
    if rtype == REPLY_TYPE_OFFSET_DATA:
        if req.cmd != CMD_READ or length < 9:
            raise NBDProtocolError(f"bad data chunk (length {length}) for a "
                                   f"{CMD_NAMES.get(req.cmd)}")
        (off,) = struct.unpack(">Q", await reader.exactly(8))
        n = length - 8
    else:
        if req.cmd != CMD_READ or length != 12:
            raise NBDProtocolError(f"bad hole chunk (length {length})")
        off, n = struct.unpack(">QI", await reader.exactly(12))
        if n == 0:
            raise NBDProtocolError("empty hole chunk")
    _claim(req, off, n)
    assert req.buf is not None
    start = off - req.offset
    if rtype == REPLY_TYPE_OFFSET_DATA:
        await reader.into(memoryview(req.buf)[start:start + n])
    else:
        req.buf[start:start + n] = bytes(n)


async def _error_chunk(reader: Reader, req: Request, length: int) -> None:
    if length < 6 or length > MAX_ERROR_CHUNK:
        raise NBDProtocolError(f"error chunk of {length} bytes (an error chunk holds "
                               f"6 to {MAX_ERROR_CHUNK})")
    payload = await reader.exactly(length)
    err, mlen = struct.unpack_from(">IH", payload)
    if 6 + mlen > length:
        raise NBDProtocolError("error chunk message longer than the chunk")
    req.error = err or EIO       # an error chunk is an error, whatever it says
    req.message = payload[6:6 + mlen].decode(errors="replace")


def _check_covered(req: Request) -> None:
    """A finished read's chunks cover it whole, without gaps."""
    pos = req.offset
    for s, e in req._seen:
        if s != pos:
            raise NBDProtocolError(f"read reply at {req.offset}+{req.length} "
                                   f"does not cover {pos}..{s}")
        pos = e
    if pos != req.offset + req.length:
        raise NBDProtocolError(f"short read reply: {pos - req.offset} of {req.length} bytes")


def _lookup(pending: dict[int, Request], cookie: int) -> Request:
    req = pending.get(cookie)
    if req is None:
        raise NBDProtocolError(f"reply for unknown cookie {cookie:#x}")
    return req


def _claim(req: Request, off: int, n: int) -> None:
    """Record that [off, off+n) arrived: inside the request, over nothing seen.

    Sorted and merged, so that a server sending pieces in order costs one
    entry, and any order costs a logarithmic search, not a scan.
    """
    if off < req.offset or off + n > req.offset + req.length:
        raise NBDProtocolError(f"chunk {off}+{n} outside the request {req.offset}+{req.length}")
    seen, end = req._seen, off + n
    i = bisect.bisect_left(seen, (off, end))
    if (i and seen[i - 1][1] > off) or (i < len(seen) and seen[i][0] < end):
        raise NBDProtocolError(f"chunk {off}+{n} overlaps an earlier chunk")
    if i and seen[i - 1][1] == off:          # touches the one before: extend it
        i -= 1
        off = seen[i][0]
        del seen[i]
    if i < len(seen) and seen[i][0] == end:  # touches the one after: absorb it
        end = seen[i][1]
        del seen[i]
    seen.insert(i, (off, end))
