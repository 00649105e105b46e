"""The daemon as a supervisor's child (``python -m memfs.supervised``): it
opens the state directory, says ``prepared``, waits for ``G`` with the
kernel's INIT, and serves the connection the supervisor holds (memfs.supervisor
describes the protocol)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import fields

from .logs import setup_logging
from .state import State, StateError
from .supervisor import F_RESEND, F_RESUMED
from .takeover import Takeover

log = logging.getLogger("memfs.supervisor")


def serve_child(state_dir: str, fuse_fd: int, chan_fd: int) -> int:
    """A daemon under the supervisor (``python -m memfs.supervised``)."""
    import trio

    from .daemon import Daemon, MountOptions
    chan = socket.socket(fileno=chan_fd)
    try:
        state = State.open(state_dir)
    except StateError as e:
        chan.send(f"error {e}".encode())
        return 1
    chan.send(b"prepared")
    msg = chan.recv(1 << 16)
    if not msg.startswith(b"G"):
        return 0  # the supervisor went away, or dropped this standby
    flags, init_msg = msg[1], msg[2:]
    try:
        known = {f.name for f in fields(MountOptions)}
        extra = {k: v for k, v in state.meta.get("options", {}).items() if k in known}
        pm = state.load_pagemap()
        if pm is not None:
            extra["new"] = False  # a source mount's map was made by its first daemon
        opts = MountOptions(mountpoint=state.mountpoint, regions=state.regions, pagemap=pm,
                            store_dir=state.store_dir, state_dir=state.path, **extra)
        state.resumed = bool(flags & F_RESUMED)
        daemon = Daemon(opts)
        daemon.state = state
        daemon.pages.journal = state.open_journal()
        daemon.takeover = Takeover(fuse_fd, init_msg, resend=bool(flags & F_RESEND))
        daemon.fs.on_init = daemon.takeover.on_init
    except Exception as e:
        log.exception("daemon could not start")
        chan.send(f"error {e}".encode())
        return 1

    def ready() -> None:
        chan.send(f"ready {os.getpid()}".encode())

    try:
        trio.run(daemon.run, ready)
    except Exception as e:
        log.exception("daemon failed")
        try:
            chan.send(f"error {e}".encode())
        except OSError:
            pass
        return 1
    finally:
        state.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memfs.supervised", description="a supervised daemon")
    p.add_argument("--state", required=True)
    p.add_argument("--fuse-fd", type=int, required=True)
    p.add_argument("--chan", type=int, required=True)
    p.add_argument("--log")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    setup_logging(a.debug, a.log)
    return serve_child(a.state, a.fuse_fd, a.chan)


if __name__ == "__main__":
    sys.exit(main())
