"""One NBD connection (reader and writer tasks) and small helpers for :mod:`nbd`.

Kept apart from the disk's policy so each module stays short: a connection
knows how to queue requests, send them in order and match replies by cookie;
when it dies it wakes every waiter, and the disk decides what to resend.  It
knows its disk only through what it is given: the disk's URI for log lines,
``closing`` (is the disk closing? then a dying connection is not news) and
``on_death`` (called once, when the connection dies).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Awaitable, Callable

import trio

from . import nbd_proto as p
from .base import DiskError
from .nbd_sock import NOTHING, OWN_MAX, TOOK, SocketReader, socket_of

log = logging.getLogger("memfs.nbd")


class Lost(Exception):
    """A request's connection died before its reply: send it again.
    ``lied``: the server broke the protocol; ``woken``: it died while the
    request waited (not before it was queued)."""

    def __init__(self, reason: str, *, lied: bool = False, woken: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.lied, self.woken = reason, lied, woken


class Conn:
    """One NBD connection in the transmission phase, with its reply reader."""

    def __init__(self, ident: int, stream: trio.abc.Stream, reader: p.Reader,
                 info: p.ExportInfo, *, uri: str, closing: Callable[[], bool],
                 on_death: Callable[["Conn", str], None]) -> None:
        self.uri = uri
        self._closing = closing
        self._on_death = on_death
        self.ident = ident
        self.stream = stream
        self.reader = reader
        self.info = info
        self.pending: dict[int, p.Request] = {}
        #: cookie -> the task waiting for its reply (None: not waiting yet);
        #: gone once the reply is in, the connection died or the caller left
        self.waiters: dict[int, trio.lowlevel.Task | None] = {}
        self._sock = socket_of(stream)
        self.outq: list[bytes | memoryview] = []
        self.out_lot = trio.lowlevel.ParkingLot()
        self.sending = False
        self.alive = True
        #: why the connection died, and whether the server broke the protocol
        self.death = ""
        self.lied = False
        #: writes acknowledged on this connection since its last flush
        self.dirty = 0
        #: the cookie of a caller reading its own reply (0: the reader task reads)
        self.owner = 0
        #: a socket's reader task waits aside (for a hang-up) while nothing
        #: is its to read; cancelled when something is; ``_hup``: it came
        self._aside: trio.CancelScope | None = None
        self._hup = False
        self._handback = trio.lowlevel.ParkingLot()
        #: replies taken by their own caller (the others went through the reader)
        self.own_replies = 0

    async def run_reader(self) -> None:
        """Match replies to requests until the connection dies, then fail the rest.

        On a socket, while nothing is in flight or a caller reads its own
        reply (``owner``), the reader waits aside until the server hangs up
        or it is given something to read."""
        reason = "closed"
        try:
            while self.alive:
                if self._aside_now():
                    await self._wait_aside()
                    continue
                cookie, done = await p.receive_reply(self.reader, self.info.structured,
                                                     self.pending)
                if done:
                    self.pending.pop(cookie)
                    task = self.waiters.pop(cookie, None)
                    if task is not None:
                        trio.lowlevel.reschedule(task)
        except DiskError as e:
            reason = str(e)
            self.lied = isinstance(e, p.NBDProtocolError)
            if self.alive and not self._closing():
                log.warning("%s: connection %d dropped: %s", self.uri, self.ident, e)
        except Exception as e:  # a bug here must not kill the trio run
            reason = f"internal error: {e!r}"
            log.exception("%s: connection %d reader failed", self.uri, self.ident)
        finally:
            await self.kill(reason)
            if isinstance(self.reader, SocketReader):
                self.reader.close()

    def _aside_now(self) -> bool:
        """Whether the reader task has nothing to read now: a caller reads
        the socket, or (on a socket) nothing is in flight and it is up."""
        if self.owner:
            return True
        return not self.pending and not self._hup and isinstance(self.reader, SocketReader)

    async def _wait_aside(self) -> None:
        """Until a hang-up (noted in ``_hup``) or a kick (``_aside`` cancelled)."""
        if self._hup:  # the watch would fire at once: wait for the owner instead
            await self._handback.park()
            return
        with trio.CancelScope() as scope:
            self._aside = scope
            try:
                await self.reader.hangup()  # type: ignore[attr-defined]
            finally:
                self._aside = None
        if not scope.cancelled_caught:
            self._hup = True

    def _kick(self) -> None:
        """Give the reader task something to read: out of its wait aside."""
        self._handback.unpark_all()
        if self._aside is not None:
            self._aside.cancel()

    async def kill(self, reason: str) -> None:
        """Hard disconnect: every request still waiting learns it was lost."""
        if self.alive:
            self.alive = False
            self.death = reason
            self._on_death(self, reason)
        self.out_lot.unpark_all()
        self._kick()
        waiters, self.waiters = self.waiters, {}
        for task in waiters.values():
            if task is not None:
                trio.lowlevel.reschedule(task)
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    @property
    def received(self) -> int:
        """Bytes read from the server so far: unchanged means it said nothing."""
        return self.reader.received

    def abandon(self, cookie: int) -> None:
        """The caller gave up on ``cookie``: its reply is still read, and dropped."""
        self.waiters.pop(cookie, None)

    def lost(self, cookie: int) -> bool:
        """True if ``cookie`` was woken by the connection dying, not by its reply."""
        return self.pending.pop(cookie, None) is not None

    async def disconnect(self, reason: str) -> None:
        """Say goodbye (NBD_CMD_DISC) if alive, give the writer half a second
        to send what is queued, then kill."""
        if self.alive:
            self.outq.append(p.encode_request(p.CMD_DISC, 0, 0, 0))
            self.out_lot.unpark_all()
            with trio.move_on_after(0.5):
                while self.alive and (self.outq or self.sending):
                    await trio.sleep(0.002)
        await self.kill(reason)

    def submit(self, cookie: int, req: p.Request,
               payload: bytes | memoryview | None) -> None:
        """Register a request and send it, or queue it for the writer task.

        Synchronous, so a caller cancelled at any point can never leave half
        a request on the wire.  With nothing queued, a request without
        payload goes straight to the non-blocking socket (no task to wake);
        what the kernel does not take, and everything else, the writer sends
        in order, batching whatever is queued into one send.  A small read
        sent so while nothing else is in flight is the caller's to read
        (``owner``): :meth:`wait` takes its reply from the socket itself.
        """
        if not self.alive:
            raise Lost(self.death or "connection is closed")
        own = not self.pending and req.buf is not None and 0 < req.length <= OWN_MAX \
            and self._aside_now() and not self.reader._buf
        self.pending[cookie] = req
        self.waiters[cookie] = None
        head = p.encode_request(req.cmd, cookie, req.offset, req.length)
        if payload is None and self._sock is not None and not self.outq and not self.sending:
            try:
                sent = os.write(self._sock.fileno(), head)
            except OSError:  # full, or broken: the writer finds out which
                sent = 0
            if sent == len(head):
                if own:
                    self.owner = cookie  # the reader task stays aside
                else:
                    self._kick()
                return
            head = head[sent:]
        self.outq.append(head)
        if payload is not None:
            self.outq.append(payload)
        self.out_lot.unpark_all()
        self._kick()

    async def _read_own(self, cookie: int) -> bool:
        """The owner's wait: its reply read off the socket in this task (no
        hand-over from the reader task).  False if something else came (it
        is buffered for the reader) or the connection was closed: then the
        reader task goes on and the caller waits for it as usual."""
        req = self.pending[cookie]
        try:
            while True:
                try:
                    await trio.lowlevel.wait_readable(self._sock)
                except trio.ClosedResourceError:  # killed: wait() sees it lost
                    return False
                got = self.reader.take_reply(cookie, req, self.info.structured)  # type: ignore
                if got == TOOK:
                    del self.pending[cookie]
                    del self.waiters[cookie]
                    self.own_replies += 1
                    return True
                if got != NOTHING:
                    return False
        finally:
            self.owner = 0
            if self.pending or self._hup:
                self._kick()

    async def wait(self, cookie: int) -> None:
        """Until ``cookie``'s reply is in or the connection died (``lost``
        tells which).  Cancelled: the reply is still read, and dropped."""
        if self.owner == cookie and await self._read_own(cookie):
            return
        if cookie not in self.waiters:
            await trio.lowlevel.checkpoint()
            return
        self.waiters[cookie] = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.waiters.pop(cookie, None)
            return trio.lowlevel.Abort.SUCCEEDED
        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run_writer(self) -> None:
        """Send queued requests in order, as few sends as possible."""
        try:
            while self.alive:
                if not self.outq:
                    await self.out_lot.park()
                    continue
                batch, self.outq = self.outq, []
                self.sending = True
                small: list[bytes | memoryview] = []
                for item in batch:
                    if len(item) <= 64 << 10:
                        small.append(item)
                        continue
                    if small:
                        await self.stream.send_all(b"".join(small))
                        small = []
                    await self.stream.send_all(item)
                if small:
                    await self.stream.send_all(b"".join(small) if len(small) > 1 else small[0])
                self.sending = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            if self.alive and not self._closing():
                log.warning("%s: connection %d: send failed: %s", self.uri, self.ident, e)
            await self.kill(f"send failed: {e}")


class RangeLock:
    """Waits until no other write overlaps [start, end), then holds the range."""

    def __init__(self, held: list[tuple[int, int, trio.Event]], start: int, end: int) -> None:
        self.held, self.start, self.end = held, start, end
        self.entry: tuple[int, int, trio.Event] | None = None

    async def __aenter__(self) -> None:
        while True:
            clash = next((ev for s, e, ev in self.held if s < self.end and self.start < e), None)
            if clash is None:
                break
            await clash.wait()
        self.entry = (self.start, self.end, trio.Event())
        self.held.append(self.entry)

    async def __aexit__(self, *exc: object) -> None:
        assert self.entry is not None
        self.held.remove(self.entry)
        self.entry[2].set()


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


async def gather(fn: Callable[..., Awaitable[object]], args: list[tuple[Any, int]]) -> None:
    """Run ``fn(*a)`` for each ``a`` concurrently; the first DiskError wins."""
    if len(args) == 1:
        await fn(*args[0])
        return
    failure: list[DiskError] = []

    async def run(a: tuple[Any, int]) -> None:
        try:
            await fn(*a)
        except DiskError as e:
            failure.append(e)
            nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        for a in args:
            nursery.start_soon(run, a)
    if failure:
        raise failure[0]
