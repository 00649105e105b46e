"""``memfs restore --serve SOCK``: keep a pool of clones waiting
(memfs.qemu.pool) until SIGINT or SIGTERM.

The pool's mount completes at once (no clone competes with it yet), so the
snapshot sits in the host page cache, shared by every clone it resumes.
When the pool stops it kills the clones that still wait; the mount stays up
if it resumed any (they run on it), and is unmounted if it resumed none.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

import trio

from ..qemu.pool import Pool
from ..qemu.restore import Snapshot, ensure_mount

__all__ = ["serve"]


def _check_free(path: str) -> None:
    """A stale socket at ``path`` (nobody listening) is removed, a live one
    refused: before anything is mounted or started."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        else:
            raise OSError(f"{path}: a restore pool already listens there")
        finally:
            probe.close()


def _listen(path: str) -> socket.socket:
    """Bound after the mount: its daemon is a fork of this process and must
    not inherit the pool's socket."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o600)
    s.listen(16)
    return s


async def _run(pool: Pool, sock: socket.socket, path: str) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with listener, trio.open_nursery() as nursery:
            t0 = time.monotonic()
            await nursery.start(pool.run)
            print(json.dumps({"ready": path, "mount": pool.mnt, "snapshot": pool.snap.dir,
                              "waiting": len(pool.waiting),
                              "seconds": round(time.monotonic() - t0, 3)}), flush=True)
            nursery.start_soon(pool.serve, listener)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def serve(a: argparse.Namespace, snap: Snapshot, mnt: str, run_dir: str,
          rate: float | None) -> int:
    """The pool in the foreground; its readiness is one JSON line on stdout."""
    path = os.path.abspath(a.serve)
    _check_free(path)
    mounted = ensure_mount(snap, mnt, trace=not a.no_trace, fork=True, store=a.store,
                           prefetch=not a.no_prefetch, prefetch_rate=rate)
    pool = Pool(snap, mnt, run_dir, a.clones, name=a.name, keep_mac=a.keep_mac,
                mac_delay=a.mac_delay)
    try:
        sock = _listen(path)
        try:
            trio.run(_run, pool, sock, path)
        finally:
            sock.close()
            os.unlink(path)
    finally:
        if mounted and not pool.handed:
            from .restore_run import undo
            undo(run_dir, [], mnt)
    print(f"memfs: restore pool {path} stopped; {pool.handed} clones were resumed",
          file=sys.stderr)
    return 0
