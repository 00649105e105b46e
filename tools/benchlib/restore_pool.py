"""bench-restore's pool rows: a restore host's steady state, where QEMUs
wait already started with ``-incoming defer`` (from ``memfs restore
--print-args``) and the snapshot's mount is up, and the restore command
only drives them (``memfs restore --qmp``).  Compared with QEMU's own full
restore into QEMUs started the same way beforehand (run_full, pool=True):
neither row pays for QEMU's start, both pay for reading their state.

Why: fleets that restore fast (Lambda SnapStart, Firecracker pools) keep
processes started; the question a pool answers is what the restore itself
costs once nothing else is left to start."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio

from memfs import hostmem
from memfs.qemu.qmp import QMP
from memfs.qemu.restore import ensure_mount, open_snapshot

from benchlib.host import drop_caches
from benchlib.mounts import MEMFS, umount
from benchlib.restore_guests import Tail, tail_all, timings


async def _start_pool(argvs: list[list[str]], rdir: Path, stack: ExitStack) -> list[str]:
    """Start each printed QEMU, its console to a file; their QMP sockets once up."""
    socks = []
    for i, argv in enumerate(argvs):
        qmp = argv[argv.index("-qmp") + 1]
        socks.append(qmp.removeprefix("unix:").split(",")[0])
        console = stack.enter_context(open(rdir / f"p{i}.console", "wb"))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.DEVNULL)
        stack.callback(proc.kill)
    for s in socks:
        with trio.fail_after(60):
            while True:
                try:
                    async with QMP.connect(s, timeout=5) as q:
                        await q.execute("query-status")
                    break
                except OSError:
                    await trio.sleep(0.02)
    return socks


async def run_memfs_pool(kind: str, n: int, snap_dir: Path, work: Path,
                         a: argparse.Namespace, trace: bool) -> dict[str, Any]:
    """memfs-pool: the mount up (its background completion waits for the
    clones' first READs), N QEMUs waiting, caches dropped; then the command."""
    snap = open_snapshot(str(snap_dir))
    run = work / f"{kind}-{n}-{'trace' if trace else 'plain'}-{time.monotonic_ns() % 10**6}"
    mnt, store, rdir = run / "mnt", run / "store", run / "run"
    for d in (mnt, rdir):
        d.mkdir(parents=True)
    out: dict[str, Any] = {"kind": kind, "clones": n, "trace": trace}
    base = [*MEMFS, "restore", str(snap_dir), "--mount", str(mnt), "--run-dir", str(rdir)]
    await trio.to_thread.run_sync(lambda: ensure_mount(
        snap, str(mnt), trace=trace, extra=["--store", str(store), "--prefetch-delay", "0.5"]))
    try:
        res = await trio.run_process(base + ["--clones", str(n), "--name", "p", "--print-args"],
                                     capture_stdout=True)
        argvs = [shlex.split(line) for line in res.stdout.decode().splitlines()]
        with ExitStack() as stack:
            socks = await _start_pool(argvs, rdir, stack)
            drop_caches()
            cmd = base + [x for s in socks for x in ("--qmp", s)] + shlex.split(a.restore_args or "")
            tails = [Tail(rdir / f"p{i}.console") for i in range(n)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tail_all, tails)
                t0 = time.monotonic()
                res = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                             check=False)
                if res.returncode:
                    raise RuntimeError(f"memfs restore --qmp: {res.stderr.decode()}")
                rep = json.loads(res.stdout)
                await trio.sleep(a.seconds)
                nursery.cancel_scope.cancel()
            per = [timings(tl, t0, c["t_cont"], a.tick / 1000) for tl, c in zip(tails, rep["clones"])]
            out.update(pool_times(rep, t0, per))
            out["per_clone"] = per
            hm = await trio.to_thread.run_sync(hostmem.measure, str(mnt), "ram0",
                                               [snap.manifest.volume["uri"]])
            out["host"] = hm.as_dict()
    finally:
        await trio.sleep(0.5)
        umount(mnt)
    return out


def pool_times(rep: dict[str, Any], t0: float, per: list[dict[str, float]]) -> dict[str, Any]:
    """The command's marks as seconds from its start, and the steps between."""
    t = rep["t"]
    first = max(p["first_tick_s"] for p in per)
    marks = [("interpreter+imports", t["start"]), ("check snapshot", t["checked"]),
             ("check mount", t["mounted"]), ("load state+cont", t["resumed"]),
             ("first tick", t0 + first)]
    steps, prev = {}, t0
    for name, at in marks:
        steps[name] = round(at - prev, 3)
        prev = at
    return {"resumed_s": round(t["resumed"] - t0, 3), "first_tick_s": first,
            "full_speed_s": max(p["full_speed_s"] for p in per), "steps": steps,
            "load_s": max(c["load_s"] for c in rep["clones"])}
