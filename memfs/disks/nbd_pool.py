"""The connections of one NBD disk: opened, supervised, reconnected.

A Pool owns the connections' reader and writer tasks (in a nursery of its
own, so that closing stops all of them at once), opens a new connection when
none is left (with back-off), tops the others up in the background, and
counts what a dead connection took with it.  The disk (memfs.disks.nbd) asks
it for the least busy live connection and decides what to resend.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Awaitable, Callable

import trio

from . import nbd_proto as p
from .base import DiskError, DiskURI
from .nbd_conn import Conn
from .nbd_handshake import handshake

log = logging.getLogger("memfs.nbd")

StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]


class Pool:
    """Up to ``want`` connections to the export of ``parsed``; ``stats`` is
    the disk's counter dict (connections, reconnects, lost writes...)."""

    def __init__(self, parsed: DiskURI, want: int, timeout: float,
                 connect: StreamFactory | None, stats: dict[str, int]) -> None:
        self.uri = parsed.uri
        self._parsed = parsed
        self.want = want
        self.timeout = timeout
        self._connect_stream = connect or self._default_connect
        self._stats = stats
        self.conns: list[Conn] = []
        self._conn_ids = itertools.count(1)
        self._reconnect_lock = trio.Lock()
        self.closing = False
        self._nursery: trio.Nursery | None = None
        self._supervisor_done = trio.Event()
        self._supervisor_scope: trio.CancelScope | None = None
        #: the export as first seen: a reconnect must find the same
        self.info: p.ExportInfo | None = None
        #: acknowledged writes on connections that died before a flush
        self.lost_writes = 0
        #: why the last reconnect failed ("" once one succeeds), for timeout messages
        self.connect_error = ""

    async def start(self, nursery: trio.Nursery | None) -> None:
        """Supervise the connections' tasks in ``nursery`` if given, else in
        a trio system task; either way ``aclose`` stops them."""
        if nursery is not None:
            await nursery.start(self._supervise)
        else:
            ready = trio.Event()
            trio.lowlevel.spawn_system_task(self._supervise_system, ready,
                                            name=f"nbd reader {self.uri}")
            await ready.wait()

    def any_alive(self) -> bool:
        return any(c.alive for c in self.conns)

    async def _supervise_system(self, ready: trio.Event) -> None:
        try:
            async with trio.open_nursery() as n:
                await n.start(self._supervise)
                ready.set()
        except Exception:  # never let a system task crash the run
            log.exception("%s: supervisor failed", self.uri)
        finally:
            ready.set()

    async def _supervise(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the reader tasks, so that aclose can cancel all of them at once."""
        try:
            with trio.CancelScope() as scope:
                self._supervisor_scope = scope
                async with trio.open_nursery() as n:
                    self._nursery = n
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self._supervisor_done.set()

    async def _default_connect(self) -> trio.abc.Stream:
        u = self._parsed
        try:
            if u.scheme == "nbd+unix":
                return await trio.open_unix_socket(u.socket)
            return await trio.open_tcp_stream(u.host, u.port)
        except OSError as e:
            raise p.NBDConnectionLost(f"cannot connect: {e.strerror or e}") from None

    async def open_conn(self) -> Conn:
        if self.closing or self._nursery is None:
            raise DiskError(f"{self.uri}: disk is closed")
        stream = await self._connect_stream()
        try:
            info, reader = await handshake(stream, self._parsed.export)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        if self.info is None:
            self.info = info
        elif info.size != self.info.size or info.min_block != self.info.min_block:
            await stream.aclose()
            raise DiskError(f"{self.uri}: export changed on reconnect "
                            f"(size {self.info.size} -> {info.size})")
        conn = Conn(next(self._conn_ids), stream, reader, info, uri=self.uri,
                    closing=lambda: self.closing, on_death=self._conn_died)
        self.conns.append(conn)
        self._stats["nbd_connections"] = len(self.conns)
        self._nursery.start_soon(conn.run_reader)
        self._nursery.start_soon(conn.run_writer)
        return conn

    async def _top_up(self) -> None:
        """After a reconnect, reopen the other connections in the background."""
        while not self.closing and len(self.conns) < self.want:
            try:
                with trio.fail_after(self.timeout):
                    await self.open_conn()
            except (DiskError, trio.TooSlowError) as e:
                log.info("%s: extra connection not reopened: %s", self.uri, e)
                return
            self._stats["nbd_reconnects"] += 1

    def _conn_died(self, conn: Conn, reason: str) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        self._stats["nbd_connections"] = len(self.conns)
        if conn.lied:
            self._stats["nbd_protocol_errors"] += 1
        if conn.dirty:
            self.lost_writes += conn.dirty
            self._stats["nbd_lost_writes"] += conn.dirty
            log.error("%s: %d acknowledged write(s) were not flushed when connection %d "
                      "dropped (%s); they may be lost", self.uri, conn.dirty, conn.ident, reason)
            conn.dirty = 0

    def pick(self) -> Conn | None:
        """The least busy live connection, if there is one (no waiting)."""
        best = None
        for c in self.conns:
            if c.alive and (best is None or len(c.pending) < len(best.pending)):
                best = c
        return best

    async def get(self) -> Conn:
        """The least busy live connection; reconnects (with back-off) if none is left."""
        delay = 0.05
        while True:
            conn = self.pick()
            if conn is not None:
                return conn
            if self.closing:
                raise DiskError(f"{self.uri}: disk is closed")
            async with self._reconnect_lock:
                if any(c.alive for c in self.conns):
                    continue
                try:
                    conn = await self.open_conn()
                except (p.NBDConnectionLost, p.NBDProtocolError) as e:
                    self.connect_error = str(e)
                    log.warning("%s: reconnect failed: %s; again in %.2f s", self.uri, e, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                self.connect_error = ""
                self._stats["nbd_reconnects"] += 1
                log.warning("%s: reconnected (connection %d)", self.uri, conn.ident)
                if conn.info.multi_conn and self.want > 1 and self._nursery:
                    self._nursery.start_soon(self._top_up)
                return conn

    def drop(self, conn: Conn, reason: str) -> None:
        """Kill a stalled connection (its waiters learn it was lost)."""
        log.warning("%s: connection %d is stalled; dropping it", self.uri, conn.ident)
        if self._nursery is not None:
            self._nursery.start_soon(conn.kill, reason)

    async def aclose(self) -> None:
        """Disconnect politely (NBD_CMD_DISC), then stop the tasks."""
        if self.closing:
            await self._supervisor_done.wait()
            return
        self.closing = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(2):
                for c in list(self.conns):
                    await c.disconnect("disk closed")
            if self._supervisor_scope is not None:
                self._supervisor_scope.cancel()
                await self._supervisor_done.wait()
