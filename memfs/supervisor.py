"""The supervisor: holds a mount's FUSE connection and (re)starts its daemon.

``memfs mount --state DIR`` (or ``--supervise``) runs this process instead
of a bare daemon.  It mounts /dev/fuse itself and keeps the descriptor and
the kernel's INIT (memfs.takeover explains how a daemon gets past libfuse's
INIT and why it sends FUSE_NOTIFY_RESEND), then runs the daemon as a child
process that inherits the descriptor.  When the daemon dies (SIGKILL, a
crash, the OOM killer) the supervisor starts another on the same
connection: readers wait instead of getting SIGBUS, the requests the dead
one had taken are sent again, and the page states come back from the state
directory (memfs.state).  The same switch is a live upgrade: ``memfs mount
--resume DIR`` while the supervisor runs, ``restart`` on its control socket
(DIR/supervisor.sock) or SIGUSR2 starts a new daemon, kills the old one and
lets the new one take over.

To keep the pause short a *standby* daemon is always started ahead: Python,
pyfuse3 and trio are loaded and it waits for "go".  Only what must come
after the old daemon is gone (reading the journal, loading the page map)
happens during the switch.

Child protocol (SOCK_SEQPACKET): child -> ``prepared``; supervisor ->
``G`` + flags + the kernel's INIT; child -> ``ready`` once it serves, or
``error MESSAGE``.  Flags: bit 0 resend (not the first daemon of this
connection), bit 1 resumed (an earlier daemon served pages of this state).

The supervisor ends when the connection does (unmounted: /dev/fuse polls
POLLERR).  SIGTERM/SIGINT/SIGHUP are passed to the daemon, which unmounts
only if no process maps a region (the daemon's own rule).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .state import State
from .takeover import connection_alive, detach

log = logging.getLogger("memfs.supervisor")

F_RESEND, F_RESUMED = 1, 2
SOCKET = "supervisor.sock"


class SupervisorError(Exception):
    """The supervised mount could not be set up or reached."""


@dataclass
class Child:
    proc: subprocess.Popen
    chan: socket.socket
    pidfd: int
    started: float
    prepared: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def leader_gone(self) -> bool:
        """The main thread (the only one that reads /dev/fuse) has exited.

        Not the same as the process being gone: a killed daemon that had a
        region file of its own mount open flushes it on exit, and that
        flush waits for write-back that only the next daemon can answer.
        Waiting for the whole process would deadlock; its main thread is
        gone (state Z) long before."""
        if self.proc.returncode is not None:
            return True
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True

    def signal_kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal_kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        self.chan.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Supervisor:
    def __init__(self, state: State, fuse_fd: int, init_msg: bytes, *, resumed: bool,
                 log_path: str | None, debug: bool) -> None:
        self.state = state
        self.fuse_fd = fuse_fd
        self.init_msg = init_msg
        self.resumed = resumed
        self.log_path = log_path
        self.debug = debug
        self.current: Child | None = None
        self.standby: Child | None = None
        #: killed daemons whose last thread may still be finishing (reaped later)
        self.dying: list[Child] = []
        self.initialized = False  # some daemon answered the INIT
        self.restarts = 0
        self.stalls: list[float] = []
        self._quick_deaths = 0

    # -- children ---------------------------------------------------------------

    def spawn(self) -> Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "memfs.supervised", "--state", self.state.path,
                "--fuse-fd", str(self.fuse_fd), "--chan", str(theirs.fileno())]
        if self.log_path:
            argv += ["--log", self.log_path]
        if self.debug:
            argv.append("--debug")
        proc = subprocess.Popen(argv, pass_fds=(self.fuse_fd, theirs.fileno()),
                                start_new_session=True, stdin=subprocess.DEVNULL)
        theirs.close()
        return Child(proc, ours, os.pidfd_open(proc.pid), 0.0)

    def _message(self, child: Child, timeout: float) -> bytes:
        """The child's next message; SupervisorError if it dies or is silent."""
        p = select.poll()
        p.register(child.chan, select.POLLIN)
        p.register(child.pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SupervisorError(f"daemon {child.proc.pid} did not answer in {timeout:g}s")
            for fd, _ in p.poll(left * 1000):
                if fd == child.chan.fileno():
                    msg = child.chan.recv(1 << 16)
                    if msg:
                        return msg
                child.proc.wait()
                raise SupervisorError(f"daemon {child.proc.pid} exited with status "
                                      f"{child.proc.returncode}")

    def switch(self, why: str, upgrade: bool = False) -> float:
        """Start (or promote) a daemon on the connection; the old one, if
        alive, is killed first.  Returns how long the mount had no daemon.
        ``upgrade``: a new process, not the standby (it runs the old code)."""
        new = self.standby
        self.standby = None
        if new is not None and upgrade:
            new.kill()
            new = None
        if new is None or not new.alive():
            if new is not None:
                new.close()
            new = self.spawn()
        try:
            msg = b"prepared" if new.prepared else self._message(new, 60)
            if msg != b"prepared":
                raise SupervisorError(f"daemon {new.proc.pid}: {msg.decode(errors='replace')}")
        except BaseException:
            new.kill()
            raise
        t0 = time.monotonic()
        old = self.current
        if old is not None:
            if not old.leader_gone():
                log.info("%s: stopping daemon %d", why, old.proc.pid)
            old.signal_kill()
            deadline = time.monotonic() + 30
            while not old.leader_gone():  # it reads no request any more
                if time.monotonic() > deadline:
                    raise SupervisorError(f"daemon {old.proc.pid} does not die")
                time.sleep(0.002)
            self.dying.append(old)
            t0 = min(t0, getattr(old, "died_at", t0))
        flags = (F_RESEND if self.initialized else 0) | \
            (F_RESUMED if (self.resumed or self.initialized) else 0)
        new.chan.send(b"G" + bytes([flags]) + self.init_msg)
        self.current = new
        try:
            msg = self._message(new, 120)
        except SupervisorError:
            raise
        if not msg.startswith(b"ready"):
            new.kill()
            self.current = None
            raise SupervisorError(msg.decode(errors="replace").removeprefix("error "))
        stall = time.monotonic() - t0
        if self.initialized:
            self.restarts += 1
            self.stalls.append(stall)
            # a death is worth a warning; an asked-for restart or upgrade is not
            log.log(logging.INFO if upgrade else logging.WARNING,
                    "%s: daemon %d took over the connection in %.0f ms (restart %d)",
                    why, new.proc.pid, stall * 1000, self.restarts)
        self.initialized = True
        new.started = time.monotonic()
        self.standby = self.spawn()
        return stall

    # -- the loop -----------------------------------------------------------------

    def run(self, ready: Callable[[str], None] = lambda _: None) -> int:
        """Serve until the connection ends; ``ready`` gets the daemon's pid."""
        sock_path = os.path.join(self.state.path, SOCKET)
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            listener.bind(sock_path)
        finally:
            os.umask(old_umask)
        listener.listen(4)
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, lambda *_: None)
        try:
            try:
                self.switch("start")
            except SupervisorError:
                detach(self.state.mountpoint)
                raise
            assert self.current is not None
            ready(str(self.current.proc.pid))
            return self._loop(listener, wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            listener.close()
            try:
                os.unlink(sock_path)
            except OSError:
                pass
            for c in [self.standby, self.current] + self.dying:
                if c is not None:
                    c.kill()

    def _loop(self, listener: socket.socket, wake: socket.socket) -> int:
        while True:
            cur = self.current
            assert cur is not None
            p = select.poll()
            p.register(self.fuse_fd, 0)  # POLLERR only: the connection is gone
            p.register(listener, select.POLLIN)
            p.register(wake, select.POLLIN)
            p.register(cur.pidfd, select.POLLIN)
            p.register(cur.chan, select.POLLIN)  # HUP: its descriptors are being closed
            for c in self.dying:
                p.register(c.pidfd, select.POLLIN)
            sb = self.standby
            if sb is not None and not sb.prepared:
                p.register(sb.chan, select.POLLIN)
            # a killed daemon's main thread exits long before its process
            # (see Child.leader_gone), and nothing polls for that: look often
            events = p.poll(25)
            if any(fd == self.fuse_fd for fd, _ in events):
                log.info("the connection of %s ended; stopping", self.state.mountpoint)
                cur.proc.wait(timeout=30)
                return 0
            for fd, ev in events:
                if fd == wake.fileno():
                    self._signals(wake)
                elif fd == listener.fileno():
                    self._control(listener)
                elif fd == cur.chan.fileno():
                    try:
                        cur.chan.recv(1 << 16, socket.MSG_DONTWAIT)
                    except OSError:
                        pass
                elif sb is not None and fd == sb.chan.fileno():
                    try:
                        msg = sb.chan.recv(1 << 16, socket.MSG_DONTWAIT)
                    except OSError:
                        msg = b""
                    if msg == b"prepared":
                        sb.prepared = True
                    else:  # it died: start another
                        sb.kill()
                        self.standby = self.spawn()
            for c in list(self.dying):
                if c.proc.poll() is not None:
                    self.dying.remove(c)
                    c.close()
            if self.current is cur and cur.leader_gone():
                self._died(cur)

    def _died(self, cur: Child) -> None:
        cur.died_at = time.monotonic()  # type: ignore[attr-defined]
        if not connection_alive(self.fuse_fd):
            return  # unmounted: the loop sees POLLERR next
        lived = time.monotonic() - cur.started
        rc = cur.proc.poll()
        log.error("daemon %d died (%s) after %.1fs; restarting it", cur.proc.pid,
                  "its main thread exited" if rc is None else
                  f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}", lived)
        # a daemon that dies as soon as it serves (a request that kills it?):
        # back off, up to 2 s, rather than spin
        self._quick_deaths = self._quick_deaths + 1 if lived < 0.1 else 0
        while True:
            if self._quick_deaths > 3:
                time.sleep(min(2.0, 0.05 * 2 ** (self._quick_deaths - 3)))
            try:
                self.switch("daemon died")
                return
            except SupervisorError as e:
                log.error("restart failed: %s; trying again", e)
                self._quick_deaths += 1

    def _signals(self, wake: socket.socket) -> None:
        for b in wake.recv(64):
            cur = self.current
            if b == signal.SIGUSR2:
                try:
                    self.switch("SIGUSR2 (upgrade)", upgrade=True)
                except SupervisorError as e:
                    log.error("upgrade failed: %s", e)
            elif cur is not None and cur.alive():
                log.info("signal %d: passed to daemon %d", b, cur.proc.pid)
                cur.proc.send_signal(signal.SIGTERM)

    def _control(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid not in (0, os.geteuid()):
                conn.sendall(b"error permission denied\n")
                return
            try:
                line = conn.recv(256).decode(errors="replace").strip()
            except OSError:
                return
            try:
                if line == "restart":
                    stall = self.switch("restart requested", upgrade=True)
                    reply = f"ok pid={self.current.proc.pid} stall_ms={stall * 1000:.0f}"  # type: ignore[union-attr]
                elif line == "status":
                    reply = "ok " + json.dumps(self.status())
                else:
                    reply = f"error unknown command {line!r} (known: restart, status)"
            except SupervisorError as e:
                reply = f"error {e}"
            try:
                conn.sendall(reply.encode() + b"\n")
            except OSError:
                pass

    def status(self) -> dict[str, Any]:
        return {"pid": self.current.proc.pid if self.current else None,
                "supervisor": os.getpid(), "restarts": self.restarts,
                "standby_ready": bool(self.standby and self.standby.prepared),
                "stall_ms": [round(s * 1000) for s in self.stalls],
                "mountpoint": self.state.mountpoint}


def ask(state_dir: str, line: str, timeout: float = 120) -> str:
    """Send one command to a running supervisor; its reply line."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.path.join(state_dir, SOCKET))
    except OSError as e:
        raise SupervisorError(f"no supervisor answers in {state_dir}: {e.strerror}") from None
    with s:
        s.sendall(line.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    text = reply.decode(errors="replace").strip()
    if not text.startswith("ok"):
        raise SupervisorError(text.removeprefix("error ") or "no reply from the supervisor")
    return text


if __name__ == "__main__":  # a supervisor started before the daemon moved to memfs.supervised
    from . import supervised
    sys.exit(supervised.main())
