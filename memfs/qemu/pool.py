"""A restore pool: clones of one snapshot started ahead of time, waiting
with ``-incoming defer`` and their migration capabilities set, resumed on
request over a unix socket (``memfs restore --serve`` / ``--pool``).

Why: a clone's first tick should not wait for what does not depend on the
request.  Starting QEMU costs 0.1-0.2 s and an interpreter with memfs's
imports 0.3 s or more, loading the device state 10 ms or more.  A pool
keeps all of it done: the snapshot checked once, the mount up (its
background completion keeps the snapshot in the page cache, shared by every
clone), QEMUs started (with -S), their NICs checked for the MAC replug and
their device state loaded, links down; a request is ``cont``, with the RAM
arriving from the pool's mount on first touch.

Each clone is daemonized QEMU with its own vmgenid and MACs, chosen when it
is started; once resumed it is the caller's (the pool forgets it after its
NICs got their new MACs), so stopping the pool kills only the clones that
still wait.  The mount stays up for the clones that run.

The protocol is one JSON line each way: ``{"snapshot": DIR, "clones": N}``
-> ``{"mount": MNT, "t": {...}, "clones": [...]}`` or ``{"error": TEXT}``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from ..snapshot import SnapshotError
from .nic import replace_nics
from .qmp import QMP, unwrap_single
from .restore import (Identity, Snapshot, launch_clone, load_devices, prepare_clone,
                      started)

__all__ = ["Pool", "PoolError"]

log = logging.getLogger("memfs.pool")

#: seconds a resumed clone gets before the pool starts its replacement
REFILL_DELAY = 0.5

#: the largest request line a pool reads
_MAX_REQUEST = 64 * 1024


class PoolError(Exception):
    """A request the pool cannot serve."""


@dataclass
class _Waiting:
    """A started clone whose task holds its QMP connection, prepared for the
    load: ``go`` sets it off, ``done`` says the load ended (``error`` if
    it failed)."""

    info: dict[str, Any]
    ident: Identity
    go: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Pool:
    """``size`` clones of ``snap`` waiting on the mount at ``mnt``; run()
    keeps it filled."""

    def __init__(self, snap: Snapshot, mnt: str, run_dir: str, size: int, *,
                 name: str = "clone", keep_mac: bool = False, mac_delay: float = 0.5) -> None:
        self.snap, self.mnt, self.run_dir, self.size = snap, mnt, run_dir, size
        self.name, self.keep_mac, self.mac_delay = name, keep_mac, mac_delay
        self.waiting: list[_Waiting] = []
        #: clones resumed so far
        self.handed = 0
        self._count = 0
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fill the pool (started() once full), and hold the clones' tasks
        until cancelled; then kill the clones that still wait."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.fill()
                task_status.started()
                await trio.sleep_forever()
        finally:
            for w in self.waiting:
                _kill(w.info)
            for w in self.waiting:   # gone when the pool says it stopped
                _wait_gone(w.info["pid"])
            self.waiting = []

    async def _start(self) -> _Waiting:
        """A new clone, waiting, its task in the pool's nursery."""
        assert self._nursery is not None
        name = f"{self.name}{self._count}"
        self._count += 1
        ident = Identity(keep_mac=self.keep_mac)

        def launch() -> dict[str, Any]:
            proc, info = launch_clone(self.snap, self.mnt, self.run_dir, name, ident)
            started(proc, info)
            return info
        info = await trio.to_thread.run_sync(launch)
        try:
            return await self._nursery.start(self._clone, _Waiting(info, ident))
        except BaseException:
            _kill(info)
            raise

    async def _clone(self, w: _Waiting, task_status: trio.TaskStatus[_Waiting]) -> None:
        """One clone's life in the pool; a clone that dies while it waits
        leaves the pool (and is replaced) instead of stopping it."""
        started = False

        def ready() -> None:
            nonlocal started
            started = True
            task_status.started(w)
        try:
            await self._life(w, ready)
        except Exception as e:
            if not started:
                raise
            log.warning("pool: %s: %s", w.info["name"], e)
            if "t_cont" in w.info:
                return   # resumed: the caller's guest now, whatever its NICs did
            w.error = w.error or e
            _kill(w.info)
            if w in self.waiting:
                self.waiting.remove(w)
                assert self._nursery is not None
                self._nursery.start_soon(self.fill)
        finally:
            w.done.set()

    async def _life(self, w: _Waiting, ready: Any) -> None:
        """Prepared and loaded (paused: a load that fails stops the clone's
        start, and the pool's), waiting for ``go``, resumed, its NICs
        replugged ``mac_delay`` s later; a clone whose ``cont`` failed is
        killed (never a half-restored guest)."""
        async with QMP.connect(w.info["qmp"], timeout=30) as qmp:
            await prepare_clone(qmp, w.ident.nics)
            w.info["load_s"] = round(await load_devices(qmp, self.snap.devices,
                                                        nics=w.ident.nics), 3)
            ready()
            await _until_set(w.go, qmp)
            try:
                await qmp.execute("cont")
            except Exception as e:
                w.error = e
                _kill(w.info)
                return
            w.info["t_cont"] = time.monotonic()
            self.handed += 1
            w.done.set()
            if w.ident.nics:
                await trio.sleep(self.mac_delay)
                await replace_nics(qmp, w.ident.nics)

    async def fill(self) -> None:
        """Start clones until ``size`` wait (one at a time: two cores are
        better left to the clones that run)."""
        while len(self.waiting) < self.size:
            async with self._lock:   # one start at a time, also against take()
                if len(self.waiting) >= self.size:
                    return
                w = await self._start()
            self.waiting.append(w)
            log.info("pool: %s waits (%d of %d)", w.info["name"], len(self.waiting), self.size)

    async def _refill_later(self, n: int) -> None:
        """Refill once the clones just resumed are past their first steps: a
        QEMU starting takes 0.1-0.2 s of CPU, which on a small host would
        come out of their first tick (REFILL_DELAY s a clone, the NIC
        replug's delay at least)."""
        await trio.sleep(max(self.mac_delay, REFILL_DELAY * n))
        await self.fill()

    async def take(self, n: int) -> list[dict[str, Any]]:
        """Resume ``n`` clones at once (started now if fewer wait); the pool
        refills in the background."""
        assert self._nursery is not None
        if n < 1:
            raise PoolError("clones must be 1 or more")
        took, self.waiting = self.waiting[:n], self.waiting[n:]
        try:
            while len(took) < n:
                async with self._lock:
                    took.append(await self._start())
        except BaseException:
            self.waiting[:0] = took
            raise
        for w in took:
            w.go.set()
        for w in took:
            await w.done.wait()
        self._nursery.start_soon(self._refill_later, n)
        failed = [w for w in took if w.error is not None]
        if failed:
            raise SnapshotError(f"{failed[0].info['name']}: {failed[0].error}")
        return sorted((w.info for w in took), key=lambda c: c["t_cont"])

    async def serve(self, listener: trio.SocketListener) -> None:
        """Answer requests on ``listener`` one at a time, until cancelled."""
        while True:
            stream = await listener.accept()
            async with stream:
                reply = await self._answer(stream)
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.warning("pool: the client left before its answer: %s", reply)

    async def _answer(self, stream: trio.SocketStream) -> dict[str, Any]:
        try:
            req = await _read_request(stream)
            if os.path.realpath(str(req.get("snapshot"))) != os.path.realpath(self.snap.dir):
                raise PoolError(f"this pool serves {self.snap.dir}, not {req.get('snapshot')}")
            n = req.get("clones", 1)
            if not isinstance(n, int) or isinstance(n, bool):
                raise PoolError(f"clones: not a number: {n!r}")
            t = {"request": time.monotonic()}
            clones = await self.take(n)
            t["resumed"] = max(c["t_cont"] for c in clones)
            return {"mount": self.mnt, "t": t, "clones": clones}
        except (PoolError, SnapshotError, OSError, trio.TooSlowError) as e:
            return {"error": str(e) or type(e).__name__}


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    data = b""
    with trio.fail_after(10):
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
            if len(data) > _MAX_REQUEST:
                raise PoolError("request too long")
    try:
        req = json.loads(data)
    except ValueError:
        raise PoolError(f"not a JSON request: {data[:80]!r}") from None
    if not isinstance(req, dict):
        raise PoolError(f"not a JSON object: {data[:80]!r}")
    return req


async def _until_set(go: trio.Event, qmp: QMP) -> None:
    """Wait for ``go``; a QEMU that exits meanwhile (its QMP connection ends)
    raises QMPClosed at once, so that the pool replaces it before anyone
    asks for it."""
    async def watch() -> None:
        await qmp.wait_closed()
        raise PoolError("QEMU exited while it waited; replaced")
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await go.wait()
            nursery.cancel_scope.cancel()


def _kill(info: dict[str, Any]) -> None:
    try:
        os.kill(info["pid"], 9)
    except (OSError, KeyError):
        pass


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Until a killed QEMU (not our child: it daemonized) has exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.01)
