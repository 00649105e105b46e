"""bench-restore's pool rows: a restore host's steady state, where clones
wait already started with ``-incoming defer`` (``memfs restore --serve``,
its mount's background completion done) and the restore command only asks
for them (``memfs restore --pool``).  Compared with QEMU's own full restore
into QEMUs started beforehand (run_full with a "-pool" kind): neither row
pays for QEMU's start, both pay for loading their state.

Why: fleets that restore fast (Lambda SnapStart, Firecracker pools) keep
processes started; the question a pool answers is what the restore itself
costs once nothing else is left to start."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from memfs import hostmem

from benchlib.host import drop_caches
from benchlib.mounts import MEMFS, umount
from benchlib.restore_guests import (Tail, command_times, restore_options, run_timed,
                                     until_complete)

#: the command as a user types it (the installed ``memfs`` script, which
#: answers a pool request before argparse loads), else ``python -m memfs``
COMMAND = [str(Path(sys.executable).with_name("memfs"))] \
    if Path(sys.executable).with_name("memfs").exists() else [sys.executable, "-m", "memfs"]


async def run_memfs_pool(kind: str, n: int, snap_dir: Path, work: Path,
                         a: argparse.Namespace, trace: bool) -> dict[str, Any]:
    """memfs-pool: ``memfs restore --serve`` with N clones waiting and its
    mount's completion done (a restore host's steady state; -cold: the
    host's caches dropped after that), then ``memfs restore --pool``."""
    run = work / f"{kind}-{n}-{'trace' if trace else 'plain'}-{time.monotonic_ns() % 10**6}"
    mnt, store, rdir, sock = run / "mnt", run / "store", run / "run", run / "pool.sock"
    for d in (mnt, rdir):
        d.mkdir(parents=True)
    out: dict[str, Any] = {"kind": kind, "clones": n, "trace": trace}
    serve = [*MEMFS, "restore", str(snap_dir), "--mount", str(mnt), "--run-dir", str(rdir),
             "--name", "p", "--clones", str(n), "--store", str(store), "--serve", str(sock)]
    serve += restore_options(a, trace)
    server = subprocess.Popen(serve,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        ready = json.loads(await trio.to_thread.run_sync(server.stdout.readline) or b"{}")
        if "ready" not in ready:
            raise RuntimeError(f"memfs restore --serve did not start: {ready}")
        out["pool_ready_s"] = ready["seconds"]
        await until_complete(mnt)
        if kind.endswith("-cold"):
            drop_caches()
        cmd = [*COMMAND, "restore", str(snap_dir), "--pool", str(sock), "--clones", str(n)]
        tails = [Tail(rdir / f"p{i}.console") for i in range(n)]
        t0, _, rep, per = await run_timed("memfs restore --pool", cmd, tails, a.seconds,
                                          a.tick / 1000)
        clones = rep["clones"]
        t = rep["t"]
        out.update(command_times(rep, t0, per, [("interpreter+request", t["request"]),
                                                ("load state+cont", t["resumed"])]))
        out["per_clone"] = per
        hm = await trio.to_thread.run_sync(hostmem.measure, str(mnt), "ram0",
                                           [str(p) for p in store.rglob("*") if p.is_file()])
        out["host"] = hm.as_dict()
        for c in clones:
            os.kill(c["pid"], 9)
    finally:
        server.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(server.wait)
        await trio.sleep(0.5)
        umount(mnt)
    return out
