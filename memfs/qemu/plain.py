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

__all__ = ["set_capabilities", "migrate_incoming", "MigrationWatch", "migrate_and_wait"]

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
