"""Real NBD servers for tests: qemu-nbd and nbdkit on loopback or unix sockets.

Every server lives in its own fresh temporary directory (socket, logs, pause
control socket, error trigger file), is started only when the caller enters
the context manager, and is always killed when it leaves — also if the test
process dies, through PR_SET_PDEATHSIG.  A server can be killed and started
again on the same address, to test reconnects.

    with qemu_nbd_server(image, fmt="qcow2", tcp=True) as uri: ...
    with nbdkit_server(["memory", "64M"], filters=["delay"], ...) as srv:
        srv.uri; srv.kill(); srv.restart(); srv.pause(); srv.resume()
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

START_TIMEOUT = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child: take the server down if the test runner dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NBDServer:
    """One server process with a fixed address; kill() and restart() keep the address."""

    def __init__(self, argv: list[str], *, tmpdir: str, tcp: bool, export: str = "",
                 socket_path: str | None = None, port: int | None = None,
                 pause_socket: str | None = None, error_file: str | None = None) -> None:
        self.argv = argv
        self.tmpdir = tmpdir
        self.tcp = tcp
        self.export = export
        self.socket_path = socket_path
        self.port = port
        self.pause_socket = pause_socket
        #: the error filter injects errors only while this file exists
        self.error_file = error_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(tmpdir, "server.log")
        self.starts = 0

    @property
    def uri(self) -> str:
        if self.tcp:
            return f"nbd://127.0.0.1:{self.port}/{self.export}"
        return f"nbd+unix:///{self.export}?socket={self.socket_path}"

    def start(self) -> None:
        if self.socket_path and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.starts += 1
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, preexec_fn=_die_with_parent)
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Ready means: something on our address says NBDMAGIC."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                if self.tcp:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                else:
                    s = socket.socket(socket.AF_UNIX)
                    s.settimeout(1)
                    s.connect(self.socket_path)
                with s:
                    if s.recv(8) == b"NBDMAGIC":
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.argv[0]} not ready after {START_TIMEOUT} s:\n" + self.log_tail())

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server abruptly (connections drop with no goodbye)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None

    def restart(self) -> None:
        """Kill (if running) and start again on the same address."""
        self.kill()
        self.start()

    def _pause_cmd(self, cmd: bytes) -> None:
        if not self.pause_socket:
            raise RuntimeError("server was started without the pause filter")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(START_TIMEOUT)
            s.connect(self.pause_socket)
            s.sendall(cmd)
            answer = s.recv(1)
        if answer != cmd.upper():
            raise RuntimeError(f"pause filter answered {answer!r} to {cmd!r}")

    def pause(self) -> None:
        """Hold every NBD request from now on (nbdkit pause filter)."""
        self._pause_cmd(b"p")

    def resume(self) -> None:
        self._pause_cmd(b"r")

    def set_errors(self, on: bool) -> None:
        """Switch the error filter's injection on or off (via its error-file)."""
        if not self.error_file:
            raise RuntimeError("server was started without an error filter error-file")
        if on:
            open(self.error_file, "w").close()
        elif os.path.exists(self.error_file):
            os.unlink(self.error_file)


@contextmanager
def _tmpdir() -> Iterator[str]:
    # unix socket paths must stay under 108 bytes: keep it short, in /tmp
    d = tempfile.mkdtemp(prefix="nbd-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def qemu_nbd(image_path: str, fmt: str = "raw", tcp: bool = False, *, export: str = "",
             read_only: bool = False, shared: int = 8, cache: str = "writeback",
             extra: Sequence[str] = ()) -> Iterator[NBDServer]:
    """A qemu-nbd serving ``image_path``, as an :class:`NBDServer`."""
    with _tmpdir() as d:
        argv = ["qemu-nbd", "-f", fmt, "-t", "-e", str(shared), f"--cache={cache}"]
        if export:
            argv += ["-x", export]
        if read_only:
            argv.append("-r")
        sock = port = None
        if tcp:
            port = free_port()
            argv += ["-b", "127.0.0.1", "-p", str(port)]
        else:
            sock = os.path.join(d, "nbd.sock")
            argv += ["-k", sock]
        argv += [*extra, os.path.abspath(image_path)]
        srv = NBDServer(argv, tmpdir=d, tcp=tcp, export=export, socket_path=sock, port=port)
        try:
            srv.start()
            yield srv
        finally:
            srv.kill()


@contextmanager
def qemu_nbd_server(image_path: str, fmt: str = "raw", tcp: bool = False,
                    **kw: object) -> Iterator[str]:
    """A qemu-nbd serving ``image_path``; yields the disk URI."""
    with qemu_nbd(image_path, fmt, tcp, **kw) as srv:  # type: ignore[arg-type]
        yield srv.uri


@contextmanager
def nbdkit_server(plugin_args: Sequence[str], filters: Sequence[str] = (), *,
                  tcp: bool = False, export: str = "", structured: bool = True,
                  pause: bool = False, error_file: bool = False,
                  extra: Sequence[str] = ()) -> Iterator[NBDServer]:
    """An nbdkit with ``plugin_args`` (plugin name, then key=value ...).

    ``pause`` adds the pause filter with its control socket (srv.pause(),
    srv.resume()); ``error_file`` passes ``error-file=`` to the error filter
    so that srv.set_errors() switches injection on and off (off at start).
    ``structured=False`` makes the server offer simple replies only.
    """
    with _tmpdir() as d:
        argv = ["nbdkit", "-f", "--exit-with-parent"]
        filters = list(filters)
        if pause and "pause" not in filters:
            filters.append("pause")
        argv += [f"--filter={f}" for f in filters]
        if not structured:
            argv.append("--no-sr")
        if export:
            argv += ["-e", export]
        sock = port = None
        if tcp:
            port = free_port()
            argv += ["-i", "127.0.0.1", "-p", str(port)]
        else:
            sock = os.path.join(d, "nbd.sock")
            argv += ["-U", sock]
        argv += list(extra)
        argv += list(plugin_args)
        pause_sock = efile = None
        if pause:
            pause_sock = os.path.join(d, "pause.sock")
            argv.append(f"pause-control={pause_sock}")
        if error_file:
            efile = os.path.join(d, "inject-errors")
            argv.append(f"error-file={efile}")
        srv = NBDServer(argv, tmpdir=d, tcp=tcp, export=export, socket_path=sock, port=port,
                        pause_socket=pause_sock, error_file=efile)
        try:
            srv.start()
            yield srv
        finally:
            srv.kill()


def pattern_bytes(offset: int, length: int) -> bytes:
    """What nbdkit's pattern plugin serves: each 8-byte word is its offset, big-endian."""
    start = offset - offset % 8
    words = range(start, offset + length + 8, 8)
    blob = b"".join(w.to_bytes(8, "big") for w in words)
    return blob[offset - start:offset - start + length]


def make_image(path: str, size: int, fmt: str = "raw", data: bytes | None = None) -> str:
    """A test image: ``data`` at offset 0 (rest zeros), converted to ``fmt`` if not raw."""
    raw = path if fmt == "raw" else path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        if data:
            f.write(data)
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, raw, path],
                       check=True, timeout=60)
        os.unlink(raw)
    return path
