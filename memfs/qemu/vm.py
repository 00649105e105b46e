"""Start and drive a QEMU process: memory backend, QMP socket, serial console.

Why: the tests, ``tools/bench-migrate`` and ``memfs migrate`` all need QEMUs
whose guest RAM is a named shared backend (a /dev/shm file, a file in a memfs
mount, or a memfd), that can wait for an incoming migration, and whose serial
console a program can read and write.

    cfg = VMConfig(kernel=..., initrd=..., append="console=ttyS0 ...",
                   memory=file_backend("/dev/shm/vm.ram", 256 << 20))
    async with VM.start(cfg, workdir) as vm:       # QEMU killed on exit
        await vm.console.expect(r"^READY")
        await vm.qmp.execute("stop")
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .qmp import QMP, unwrap_single

__all__ = ["VM", "VMConfig", "Console", "file_backend", "memfd_backend", "qemu_binary",
           "longest_gap"]


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64, or None when it is not installed."""
    return shutil.which("qemu-system-x86_64")


def file_backend(path: str | os.PathLike[str], size: int, share: bool = True,
                 id: str = "ram0", **extra: Any) -> dict[str, Any]:
    """Guest RAM in a file (``mem-path``): /dev/shm, a memfs mount, hugetlbfs."""
    return {"qom-type": "memory-backend-file", "id": id, "size": size,
            "mem-path": os.fspath(path), "share": share, **extra}


def memfd_backend(size: int, share: bool = True, id: str = "ram0", **extra: Any) -> dict[str, Any]:
    """Guest RAM in a memfd (capture reads it through /proc/PID/fd/N)."""
    return {"qom-type": "memory-backend-memfd", "id": id, "size": size, "share": share, **extra}


def _object_arg(obj: dict[str, Any]) -> str:
    parts = [str(obj["qom-type"])]
    for k, v in obj.items():
        if k == "qom-type":
            continue
        if isinstance(v, bool):
            v = "on" if v else "off"
        parts.append(f"{k}={str(v).replace(',', ',,')}")
    return ",".join(parts)


@dataclass
class VMConfig:
    """What to start. ``memory`` is a backend dict (file_backend, memfd_backend);
    its id names the RAM block, which must be the same on both migration sides."""

    memory: dict[str, Any]
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    incoming: str | None = None         # "defer": wait for migrate-incoming
    paused: bool = False                # -S: do not run until "cont"
    machine: str = "q35"
    accel: str = "tcg"
    smp: int = 1
    name: str = "memfs-guest"
    extra_args: list[str] = field(default_factory=list)

    def argv(self, qmp_path: str) -> list[str]:
        """The QEMU command line (serial console on stdio)."""
        qemu = qemu_binary() or "qemu-system-x86_64"
        size_mib = int(self.memory["size"]) >> 20
        argv = [qemu, "-name", self.name, "-accel", self.accel,
                "-machine", f"{self.machine},memory-backend={self.memory['id']}",
                "-m", f"{size_mib}M", "-smp", str(self.smp),
                "-object", _object_arg(self.memory),
                "-nodefaults", "-display", "none", "-monitor", "none",
                "-serial", "stdio", "-no-reboot",
                "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if self.kernel:
            argv += ["-kernel", self.kernel]
        if self.initrd:
            argv += ["-initrd", self.initrd]
        if self.append:
            argv += ["-append", self.append]
        if self.incoming:
            argv += ["-incoming", self.incoming]
        if self.paused:
            argv.append("-S")
        return argv + list(self.extra_args)


_TICK = re.compile(rb"^T (\d+)(?: (\d+))?$")


class Console:
    """The guest's serial console: lines with host arrival times, and ticks.

    Tick lines (``T <n> ...``) are kept apart, as (host monotonic time, n), so a
    benchmark can find the guest's longest stall even across a migration."""

    def __init__(self, send_stream: trio.abc.SendStream | None) -> None:
        self._send = send_stream
        self.lines: list[tuple[float, str]] = []
        self.ticks: list[tuple[float, int]] = []
        self._cursor = 0
        self._changed = trio.Event()
        self.closed = False

    async def send(self, line: str) -> None:
        """Write one line to the guest's console."""
        if self._send is None:
            raise RuntimeError("console has no input")
        await self._send.send_all(line.encode() + b"\n")

    def mark(self) -> int:
        """A position in ``lines``: pass it as ``since`` to expect()."""
        return len(self.lines)

    async def expect(self, pattern: str, timeout: float = 60.0, since: int | None = None) -> re.Match[str]:
        """Wait for a line matching ``pattern`` (re.search) after position
        ``since`` (default: after the previous expect's match) and return the
        match. Raises trio.TooSlowError, or EOFError if QEMU exited."""
        rx = re.compile(pattern)
        pos = self._cursor if since is None else since
        with trio.fail_after(timeout):
            while True:
                while pos < len(self.lines):
                    m = rx.search(self.lines[pos][1])
                    pos += 1
                    if m:
                        self._cursor = pos
                        return m
                if self.closed:
                    raise EOFError(f"console closed before {pattern!r}; last lines: "
                                   + " | ".join(text for _, text in self.lines[-5:]))
                self._changed = trio.Event() if self._changed.is_set() else self._changed
                await self._changed.wait()

    async def command(self, line: str, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Send ``line`` and wait for the reply matching ``pattern``."""
        since = self.mark()
        await self.send(line)
        return await self.expect(pattern, timeout, since=since)

    async def _pump(self, stream: trio.abc.ReceiveStream, log: Any = None) -> None:
        buf = b""
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                now = time.monotonic()
                buf += data
                *done, buf = buf.split(b"\n")
                for raw in done:
                    raw = raw.rstrip(b"\r")
                    m = _TICK.match(raw)
                    if m:
                        self.ticks.append((now, int(m.group(1))))
                        continue
                    text = raw.decode("utf-8", "replace")
                    self.lines.append((now, text))
                    if log is not None:
                        log.write(f"{now:.3f} {text}\n")
                        log.flush()
                if done:
                    self._changed.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed = True
            self._changed.set()


class VM:
    """A running QEMU: ``process``, ``qmp`` (connected), ``console``, ``stderr``."""

    def __init__(self, config: VMConfig, workdir: Path, process: trio.Process,
                 qmp: QMP, console: Console) -> None:
        self.config = config
        self.workdir = workdir
        self.process = process
        self.qmp = qmp
        self.console = console
        self.qmp_path = workdir / f"{config.name}.qmp"
        self._stderr = bytearray()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    @classmethod
    @asynccontextmanager
    async def start(cls, config: VMConfig, workdir: str | os.PathLike[str],
                    log_console: bool = True) -> AsyncIterator[VM]:
        """Start QEMU, connect QMP, pump its console; on exit ask QEMU to quit
        and kill it if it has not exited within 3 s. The console is logged to
        ``workdir/NAME.console`` unless ``log_console`` is false."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        qmp_path = workdir / f"{config.name}.qmp"
        qmp_path.unlink(missing_ok=True)
        argv = config.argv(str(qmp_path))
        (workdir / f"{config.name}.cmdline").write_text(" ".join(argv) + "\n")
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        log = open(workdir / f"{config.name}.console", "w") if log_console else None
        try:
            console = Console(process.stdin)
            with unwrap_single():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(console._pump, process.stdout, log)
                    stderr = bytearray()
                    nursery.start_soon(_collect, process.stderr, stderr)
                    try:
                        await _wait_socket(qmp_path, process, stderr)
                        async with QMP.connect(qmp_path) as qmp:
                            vm = cls(config, workdir, process, qmp, console)
                            vm._stderr = stderr
                            try:
                                yield vm
                            finally:
                                await _shutdown(vm)
                    finally:
                        _kill(process)
                        nursery.cancel_scope.cancel()
        finally:
            _kill(process)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await process.wait()
            if log is not None:
                log.close()

    def memfd_path(self) -> str:
        """/proc/PID/fd/N of the guest's memfd RAM (memfd_backend): the path
        ``memfs capture --ram`` reads while QEMU runs."""
        fds = Path(f"/proc/{self.pid}/fd")
        for fd in sorted(fds.iterdir(), key=lambda p: int(p.name)):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("/memfd:") and "memory-backend" in target:
                return str(fd)
        raise FileNotFoundError(f"QEMU {self.pid} has no memory-backend memfd open")

    async def wait_status(self, status: str, timeout: float = 60.0) -> None:
        """Poll query-status until the run state is ``status`` (e.g. running)."""
        with trio.fail_after(timeout):
            while (await self.qmp.execute("query-status"))["status"] != status:
                await trio.sleep(0.02)


async def _wait_socket(path: Path, process: trio.Process, stderr: bytearray,
                       timeout: float = 30.0) -> None:
    """Wait for QEMU to create its QMP socket; fail with its stderr if it exits."""
    with trio.fail_after(timeout):
        while not path.exists():
            if process.poll() is not None:
                await trio.sleep(0.2)       # let the stderr pump catch up
                raise RuntimeError(f"QEMU exited with {process.returncode}: "
                                   + stderr.decode("utf-8", "replace").strip())
            await trio.sleep(0.02)


async def _collect(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    try:
        while data := await stream.receive_some(65536):
            into += data
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _shutdown(vm: VM) -> None:
    if vm.process.returncode is not None:
        return
    with trio.CancelScope(shield=True):
        with trio.move_on_after(3):
            try:
                await vm.qmp.execute("quit", timeout=2)
            except Exception:
                pass
            await vm.process.wait()


def _kill(process: trio.Process) -> None:
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def longest_gap(ticks: Iterable[tuple[float, int]], start: float | None = None,
                end: float | None = None) -> float:
    """Longest interval, in seconds, between consecutive tick arrivals within
    [start, end] (host monotonic time); pass the ticks of both migration sides
    together to measure the stall across the switch-over."""
    times = sorted(t for t, _ in ticks if end is None or t <= end)
    if start is not None:
        first = next((i for i, t in enumerate(times) if t >= start), len(times))
        times = times[max(first - 1, 0):]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)
