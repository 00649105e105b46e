"""A small trio client for the QEMU Machine Protocol (QMP).

Why our own: the ``qemu.qmp`` package is built on asyncio; memfs runs on trio.
QMP itself is small: JSON objects, one per line, over a unix socket; a greeting,
``qmp_capabilities``, then commands (matched to replies by ``id``) and
asynchronous events.

    async with QMP.connect("/run/vm.qmp") as qmp:
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        await qmp.execute("migrate", {"uri": "unix:/run/mig.sock"})
        await qmp.wait_event("MIGRATION", match={"status": "completed"})
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
from array import array
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

__all__ = ["QMP", "QMPError", "QMPClosed"]


class QMPError(Exception):
    """QEMU answered a command with an error: ``desc`` is QEMU's message."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({cls})")
        self.command = command
        self.cls = cls
        self.desc = desc


class QMPClosed(ConnectionError):
    """The QMP connection ended (QEMU quit or crashed)."""


class _Pending:
    """One command waiting for its reply."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None


class QMP:
    """A connected, negotiated QMP session. Create it with ``QMP.connect``."""

    def __init__(self, stream: trio.SocketStream, path: str) -> None:
        self._stream = stream
        self.path = path
        self.greeting: dict[str, Any] = {}
        #: every event received, in order (dicts with event, data, timestamp)
        self.events: list[dict[str, Any]] = []
        self._unconsumed: list[dict[str, Any]] = []
        self._event_arrived = trio.Event()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._closed: BaseException | None = None
        self._send_lock = trio.Lock()
        self._buf = bytearray()

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> AsyncIterator[QMP]:
        """Connect to a QMP unix socket (waiting up to ``timeout`` s for it to
        appear: QEMU creates it a moment after it starts), negotiate
        capabilities, and keep reading replies and events until the block ends."""
        path = os.fspath(path)
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_unix_socket(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.02)
        async with stream:
            qmp = cls(stream, path)
            with trio.fail_after(timeout):
                greeting = await qmp._read_message()
            if "QMP" not in greeting:
                raise QMPClosed(f"{path}: not a QMP greeting: {greeting!r}")
            qmp.greeting = greeting["QMP"]
            with unwrap_single():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(qmp._reader)
                    await qmp.execute("qmp_capabilities", timeout=timeout)
                    try:
                        yield qmp
                    finally:
                        nursery.cancel_scope.cancel()

    # -- commands ---------------------------------------------------------

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = 60.0, fds: Sequence[int] = ()) -> Any:
        """Run ``command`` and return its ``return`` value; raise QMPError with
        QEMU's description if it failed, QMPClosed if the connection ended,
        trio.TooSlowError after ``timeout`` seconds (None: wait forever).
        ``fds`` go along with the command (SCM_RIGHTS), as ``getfd`` and
        ``add-fd`` expect; QEMU keeps its own copies."""
        if self._closed is not None:
            raise QMPClosed(f"{self.path}: connection closed") from self._closed
        cid = f"memfs-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        pending = self._pending[cid] = _Pending()
        try:
            async with self._send_lock:
                try:
                    await self._send(json.dumps(msg).encode() + b"\n", fds)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    raise QMPClosed(f"{self.path}: cannot send {command}") from e
            with trio.fail_after(math.inf if timeout is None else timeout):
                await pending.done.wait()
        finally:
            self._pending.pop(cid, None)
        reply = pending.reply
        if reply is None:
            if command == "quit":
                return {}
            raise QMPClosed(f"{self.path}: connection closed during {command}") from self._closed
        if "error" in reply:
            err = reply["error"]
            raise QMPError(command, err.get("class", "?"), err.get("desc", "?"))
        return reply.get("return")

    async def send_file(self, name: str, path: str, flags: int = os.O_RDONLY,
                        mode: int = 0o600) -> None:
        """``path`` opened here with ``flags`` and given to QEMU as fd
        ``name`` (``getfd``), for an ``fd:NAME`` migration URI: QEMU reads or
        writes the file itself, where ``exec:cat`` would spawn a shell and
        cat.  This process's copy is closed."""
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        try:
            await self.execute("getfd", {"fdname": name}, fds=[fd])
        finally:
            os.close(fd)

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        if not fds:
            await self._stream.send_all(data)
            return
        sent = await self._stream.socket.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds).tobytes())])
        if sent < len(data):   # the fds went with the first bytes
            await self._stream.send_all(data[sent:])

    # -- events -----------------------------------------------------------

    async def wait_event(self, name: str, timeout: float | None = 60.0,
                         match: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the oldest not-yet-waited-for event called ``name`` whose
        ``data`` contains all items of ``match``; wait for it if none arrived
        yet. Events that arrived before the call count, so there is no race
        between issuing a command and waiting for its event."""
        with trio.fail_after(math.inf if timeout is None else timeout):
            while True:
                for i, ev in enumerate(self._unconsumed):
                    if ev.get("event") == name and _matches(ev.get("data", {}), match):
                        del self._unconsumed[i]
                        return ev
                if self._closed is not None:
                    raise QMPClosed(f"{self.path}: closed while waiting for {name}")
                self._event_arrived = trio.Event() if self._event_arrived.is_set() else self._event_arrived
                await self._event_arrived.wait()

    async def wait_closed(self) -> None:
        """Until the connection ends: QEMU exited or closed it."""
        while self._closed is None:
            self._event_arrived = trio.Event() if self._event_arrived.is_set() else self._event_arrived
            await self._event_arrived.wait()

    # -- internals --------------------------------------------------------

    async def _read_message(self) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if line.strip():
                    return json.loads(line)
                continue
            data = await self._stream.receive_some(65536)
            if not data:
                raise QMPClosed(f"{self.path}: QEMU closed the connection")
            self._buf += data

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self._read_message()
                if "event" in msg:
                    self.events.append(msg)
                    self._unconsumed.append(msg)
                    self._event_arrived.set()
                elif "id" in msg and msg["id"] in self._pending:
                    p = self._pending[msg["id"]]
                    p.reply = msg
                    p.done.set()
        except (QMPClosed, trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as e:
            self._closed = e
        finally:
            if self._closed is None:
                self._closed = QMPClosed("reader stopped")
            for p in self._pending.values():
                p.done.set()
            self._event_arrived.set()


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise a lone exception out of a nursery's ExceptionGroup.

    Why: our context managers run helper tasks in a nursery around the
    caller's block; an error in that block should reach the caller as itself,
    not wrapped in a group."""
    try:
        yield
    except BaseExceptionGroup as eg:
        if len(eg.exceptions) == 1:
            raise eg.exceptions[0]
        raise


def _matches(data: dict[str, Any], match: dict[str, Any] | None) -> bool:
    return not match or all(data.get(k) == v for k, v in match.items())
