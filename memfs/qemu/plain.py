"""Plain QEMU migration steps over QMP: capabilities, incoming, outgoing, progress.

Why: the tests and tools/bench-migrate run QEMU's own migrations (pre-copy,
post-copy, x-ignore-shared) as baselines and as the device-state step of
``memfs migrate``; the QMP choreography lives here once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import trio

from .qmp import QMP

__all__ = ["set_capabilities", "migrate_incoming", "MigrationWatch", "migrate_and_wait",
           "StreamCounter"]

FINAL = ("completed", "failed", "cancelled")


async def set_capabilities(qmp: QMP, **caps: bool) -> None:
    """migrate-set-capabilities; keyword names use _ for - (x_ignore_shared)."""
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]})


async def migrate_incoming(qmp: QMP, uri: str) -> None:
    """Start listening on a destination started with ``-incoming defer``."""
    await qmp.execute("migrate-incoming", {"uri": uri})


@dataclass
class MigrationWatch:
    """The source's query-migrate, polled: when each status was first seen
    (host monotonic time), and the last reply."""

    started: float
    first_seen: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.info.get("status", "none")

    def at(self, status: str) -> float | None:
        """Seconds from the migrate command to the first sight of ``status``."""
        t = self.first_seen.get(status)
        return None if t is None else t - self.started

    async def poll(self, qmp: QMP) -> dict[str, Any]:
        self.info = await qmp.execute("query-migrate")
        self.first_seen.setdefault(self.status, time.monotonic())
        return self.info

    async def until(self, qmp: QMP, statuses: tuple[str, ...] = FINAL, timeout: float = 300.0,
                    interval: float = 0.02) -> dict[str, Any]:
        """Poll until the status is one of ``statuses`` (or final); raise
        RuntimeError if the migration failed."""
        with trio.fail_after(timeout):
            while True:
                info = await self.poll(qmp)
                if info.get("status") == "failed":
                    raise RuntimeError(f"migration failed: {info.get('error-desc', info)}")
                if info.get("status") in statuses or info.get("status") in FINAL:
                    return info
                await trio.sleep(interval)


async def migrate_and_wait(src: QMP, uri: str, timeout: float = 300.0) -> MigrationWatch:
    """``migrate`` to ``uri`` and poll the source until the migration completes."""
    watch = MigrationWatch(started=time.monotonic())
    await src.execute("migrate", {"uri": uri})
    await watch.until(src, timeout=timeout)
    return watch


class StreamCounter:
    """A unix-socket relay from ``listen`` to ``target`` that counts the bytes
    the source sends: the migration stream as it is on the wire."""

    def __init__(self, listen: str, target: str) -> None:
        self.listen, self.target = listen, target
        self.sent = 0

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.listen)
        sock.listen(1)
        listener = trio.SocketListener(sock)
        task_status.started()
        async with listener, trio.open_nursery() as nursery:
            while True:
                conn = await listener.accept()
                nursery.start_soon(self._relay, conn)

    async def _relay(self, conn: trio.SocketStream) -> None:
        async with conn, await trio.open_unix_socket(self.target) as up:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, conn, up, True, nursery)
                nursery.start_soon(self._pump, up, conn, False, nursery)

    async def _pump(self, a: trio.SocketStream, b: trio.SocketStream, count: bool,
                    nursery: trio.Nursery) -> None:
        try:
            while data := await a.receive_some(1 << 20):
                if count:
                    self.sent += len(data)
                await b.send_all(data)
            await b.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()
