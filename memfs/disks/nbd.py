"""NBD back end: a trio NBD client with several connections, retries and reconnects.

The wire format is in :mod:`nbd_proto`, one connection in :mod:`nbd_conn`,
opening and reopening them in :mod:`nbd_pool`; this module adds the policy a
live migration needs.  Each connection has a background reader task that matches
replies to requests by cookie, so any number of requests may be in flight; a
small read alone on its connection reads its own reply (no hand-over: see
:mod:`nbd_conn`).
A request is driven by the task that asked for it: when its connection dies
it is sent again on a new one (reads always; writes too, because writes to
overlapping ranges are serialised here, so a resent write can never land
over a newer one); error replies are retried with back-off a bounded number
of times; and the whole request, retries included, has one deadline: the
``timeout``, or the caller's deadline if that is nearer (the fetcher passes
one, so that its own retries share the same budget).
Only :class:`DiskError` (or ``trio.Cancelled``) leaves ``read``/``write``/
``flush``: a FUSE handler above must never see anything else.

Tuning comes from ``open()`` keywords or the URI query:
``?timeout=SECONDS&connections=N&retries=N``.
"""

from __future__ import annotations

import itertools
import logging

import trio

from . import nbd_proto as p
from .base import Disk, DiskError, DiskURI
from .nbd_conn import Lost as _Lost
from .nbd_conn import RangeLock as _RangeLock
from .nbd_conn import gather as _gather
from .nbd_conn import round_up as _round_up
from .nbd_pool import Pool, StreamFactory

log = logging.getLogger("memfs.nbd")

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
MAX_CONNECTIONS = 4
#: errors a retry cannot fix: the request itself is wrong or the disk is full
_FATAL_ERRNOS = {p.EPERM, p.EINVAL, p.ENOSPC, p.EOVERFLOW, p.ENOTSUP}
#: reads longer than this are answered with a view of the request's buffer, as
#: the file disk answers large reads: no copy (a 1 MiB copy into fresh memory
#: is some 256 page faults)
SMALL = 128 << 10


class _What:
    """A request in words for log lines and errors, put into words only when
    one is written (the hot path formats nothing)."""

    __slots__ = ("cmd", "offset", "length")

    def __init__(self, cmd: int, offset: int, length: int) -> None:
        self.cmd, self.offset, self.length = cmd, offset, length

    def __str__(self) -> str:
        return f"{p.CMD_NAMES[self.cmd]} of {self.length} bytes at {self.offset}"


class NBDDisk(Disk):
    """An NBD export, read (and for capture written) over up to 4 connections."""

    def __init__(self, parsed: DiskURI, writable: bool, timeout: float,
                 connections: int, retries: int, connect: StreamFactory | None) -> None:
        self.uri = parsed.uri
        self._writable = writable
        self.timeout = timeout
        self.retries = retries
        self._cookies = itertools.count(1)
        self._writes: list[tuple[int, int, trio.Event]] = []
        self.info: p.ExportInfo | None = None
        self.size = 0
        self.min_block = 1
        self._stats = {k: 0 for k in (
            "nbd_connections", "nbd_reconnects", "nbd_retries", "nbd_resent", "nbd_in_flight",
            "nbd_timeouts", "nbd_errors", "nbd_server_errors", "nbd_protocol_errors",
            "nbd_requests", "nbd_bytes_read", "nbd_bytes_written", "nbd_flushes",
            "nbd_lost_writes")}
        self._pool = Pool(parsed, connections, timeout, connect, self._stats)

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(cls, parsed: DiskURI, *, writable: bool = False,
                   timeout: float | None = None, connections: int | None = None,
                   retries: int | None = None, nursery: trio.Nursery | None = None,
                   connect: StreamFactory | None = None) -> "NBDDisk":
        """Connect and negotiate.  Background readers live in ``nursery`` if
        given, else in a trio system task; either way ``aclose`` stops them.
        ``connect`` replaces the socket (tests drive the client over memory streams).
        """
        q = parsed.query
        try:
            timeout = float(timeout if timeout is not None else q.get("timeout", DEFAULT_TIMEOUT))
            connections = int(connections if connections is not None
                              else q.get("connections", MAX_CONNECTIONS))
            retries = int(retries if retries is not None else q.get("retries", DEFAULT_RETRIES))
        except ValueError as e:
            raise DiskError(f"{parsed.uri}: bad option: {e}") from None
        if not (timeout > 0 and connections >= 1 and retries >= 0):
            raise DiskError(f"{parsed.uri}: timeout, connections and retries must be positive")
        self = cls(parsed, writable, timeout, min(connections, 16), retries, connect)
        await self._pool.start(nursery)
        try:
            with trio.fail_after(self.timeout):
                conn = await self._pool.open_conn()
            info = self.info = conn.info
            self.size = info.size
            self.min_block = info.min_block
            mp = min(info.max_payload, 32 << 20)
            self.max_request = max(mp - mp % info.min_block, info.min_block)
            if writable and info.read_only:
                raise DiskError(f"{self.uri}: export is read-only")
            n = self._pool.want if info.multi_conn else 1
            for _ in range(n - 1):
                with trio.fail_after(self.timeout):
                    await self._pool.open_conn()
        except trio.TooSlowError:
            await self.aclose()
            raise DiskError(f"{parsed.uri}: no answer within {self.timeout:g} s") from None
        except DiskError as e:
            await self.aclose()
            if str(e).startswith(parsed.uri):
                raise
            raise type(e)(f"{parsed.uri}: {e}") from None
        except BaseException:
            await self.aclose()
            raise
        log.info("%s: %d bytes, %d connection(s), min/pref/max block %d/%d/%d, %s replies",
                 self.uri, info.size, len(self._pool.conns), info.min_block, info.pref_block,
                 info.max_payload, "structured" if info.structured else "simple")
        return self

    # ------------------------------------------------------------ requests

    async def _request(self, cmd: int, offset: int, length: int,
                       payload: bytes | memoryview | None = None,
                       deadline: float | None = None) -> bytearray | None:
        """One command, under one deadline, resent and retried until it succeeds.

        Lost with its connection: resent (as a retry if the server lied);
        an error reply: retried with back-off, ``retries`` times at most.
        The deadline is ``timeout`` seconds from now, or the caller's
        ``deadline`` if nearer: the request fails then, whatever it took.
        """
        what = _What(cmd, offset, length)
        self._stats["nbd_requests"] += 1
        self._stats["nbd_in_flight"] += 1
        last = "no reply from the server"
        started = trio.current_time()
        limit = started + self.timeout
        if deadline is not None:
            limit = min(limit, deadline)
        try:
            with trio.move_on_at(limit) as scope:
                errors = 0
                while True:
                    try:
                        req = await self._attempt(cmd, offset, length, payload, scope)
                    except _Lost as e:
                        last = e.reason
                        if e.lied:                  # a lying server gets few chances
                            if errors >= self.retries:
                                break
                            errors += 1
                            self._stats["nbd_retries"] += 1
                        self._stats["nbd_resent"] += 1
                        if e.woken:
                            log.info("%s: %s resent after connection loss", self.uri, what)
                        continue
                    if not req.error:
                        return req.buf
                    self._stats["nbd_server_errors"] += 1
                    last = f"server error {p.errno_name(req.error)}" + (
                        f": {req.message}" if req.message else "")
                    if req.error in _FATAL_ERRNOS or errors >= self.retries:
                        break
                    errors += 1
                    self._stats["nbd_retries"] += 1
                    log.warning("%s: %s failed (%s); retry %d of %d", self.uri, what, last,
                                errors, self.retries)
                    await trio.sleep(min(0.02 * 4 ** (errors - 1), 1.0))
            if scope.cancelled_caught:
                self._stats["nbd_timeouts"] += 1
                took = trio.current_time() - started
                if self._pool.connect_error and not self._pool.any_alive():
                    last = f"{last}; reconnecting: {self._pool.connect_error}"
                last = f"timed out after {took:.1f} s ({last})"
        except DiskError as e:
            last = str(e)
        finally:
            self._stats["nbd_in_flight"] -= 1
        self._stats["nbd_errors"] += 1
        log.error("%s: %s failed: %s", self.uri, what, last)
        raise DiskError(f"{self.uri}: {what} failed: {last}")

    async def _attempt(self, cmd: int, offset: int, length: int,
                       payload: bytes | memoryview | None,
                       scope: trio.CancelScope) -> p.Request:
        """Send once and wait for the reply (error replies included); _Lost if
        the connection died first, or dropped if it is wedged: silent since
        the send when ``scope`` (the request's deadline) expires."""
        conn = self._pool.pick() or await self._pool.get()
        req = p.Request(cmd, offset, length, bytearray(length) if cmd == p.CMD_READ else None)
        cookie = next(self._cookies)
        sent_at = conn.received
        conn.submit(cookie, req, payload)  # _Lost if it is dead already
        try:
            await conn.wait(cookie)
        except trio.Cancelled:
            conn.abandon(cookie)
            if scope.cancel_called and conn.received == sent_at:
                self._pool.drop(conn, "no reply within the timeout")
            raise
        if conn.lost(cookie):
            raise _Lost(conn.death or "connection lost", lied=conn.lied, woken=True)
        if cmd == p.CMD_WRITE and not req.error:
            conn.dirty += 1
        return req

    def _check(self, offset: int, length: int) -> None:
        if self._pool.closing:
            raise DiskError(f"{self.uri}: disk is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"{self.uri}: {length} bytes at {offset} is beyond the end "
                            f"({self.size} bytes)")

    def _pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        step = self.max_request
        return [(o, min(step, end - o)) for o in range(start, end, step)]

    async def _read_aligned(self, start: int, end: int,
                            deadline: float | None = None) -> bytearray:
        pieces = self._pieces(start, end)
        if len(pieces) == 1:
            out = await self._request(p.CMD_READ, start, end - start, deadline=deadline)
            assert out is not None
            return out
        out = bytearray(end - start)

        async def one(o: int, n: int) -> None:
            data = await self._request(p.CMD_READ, o, n, deadline=deadline)
            out[o - start:o - start + n] = data  # type: ignore[index]
        await _gather(one, pieces)
        return out

    async def read(self, offset: int, length: int, *, deadline: float | None = None) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        mb = self.min_block
        if not offset % mb and not length % mb and length <= self.max_request:
            buf = await self._request(p.CMD_READ, offset, length, deadline=deadline)
            assert buf is not None
            self._stats["nbd_bytes_read"] += length
            return bytes(buf) if length <= SMALL else memoryview(buf)  # type: ignore
        start, end = offset - offset % mb, _round_up(offset + length, mb)
        if end > self.size:
            raise DiskError(f"{self.uri}: {length} bytes at {offset} cannot be read "
                            f"in {mb}-byte blocks")
        buf = await self._read_aligned(start, end, deadline)
        self._stats["nbd_bytes_read"] += length
        view = memoryview(buf)[offset - start:offset - start + length]
        return bytes(view) if length <= SMALL else view  # type: ignore[return-value]

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if not self._writable:
            raise DiskError(f"{self.uri}: opened read-only")
        data = memoryview(data).cast("B")
        self._check(offset, len(data))
        if not len(data):
            return
        mb = self.min_block
        start, end = offset - offset % mb, _round_up(offset + len(data), mb)
        async with self._write_range(start, end):
            if (start, end) != (offset, offset + len(data)):
                # Read-modify-write of the partial blocks, safe because
                # overlapping writes are serialised by _write_range.
                buf = await self._read_aligned(start, end)
                buf[offset - start:offset - start + len(data)] = data
                data = memoryview(buf)
            await _gather(lambda o, n: self._request(p.CMD_WRITE, o, n,
                                                     data[o - start:o - start + n]),
                          self._pieces(start, end))
        self._stats["nbd_bytes_written"] += end - start

    def _write_range(self, start: int, end: int) -> "_RangeLock":
        return _RangeLock(self._writes, start, end)

    async def flush(self) -> None:
        """Flush every connection; fail if any acknowledged write may have been lost."""
        if self._pool.closing:
            raise DiskError(f"{self.uri}: disk is closed")
        if not self._writable:
            return
        assert self.info is not None
        if self.info.can_flush:
            # We only open several connections when the server has CAN_MULTI_CONN,
            # so one flush covers every write completed (on any connection)
            # before it was sent.
            dirty = {c: c.dirty for c in self._pool.conns}
            await self._request(p.CMD_FLUSH, 0, 0)
            for c, n in dirty.items():
                c.dirty -= min(c.dirty, n)
            self._stats["nbd_flushes"] += 1
        if self._pool.lost_writes:
            n, self._pool.lost_writes = self._pool.lost_writes, 0
            raise DiskError(f"{self.uri}: {n} acknowledged write(s) were on a connection "
                            "that dropped before a flush; they may not have landed")

    async def aclose(self) -> None:
        """Disconnect politely (NBD_CMD_DISC), then stop the reader tasks."""
        await self._pool.aclose()

    def stats(self) -> dict[str, int]:
        return dict(self._stats)


__all__ = ["NBDDisk", "DEFAULT_TIMEOUT"]
