"""bench-restore's runs: N clones restored by QEMU (the full stream) or by
``memfs restore`` (lazily, from the snapshot's page map), timed to each
clone's first tick and to full speed, with the host memory they cost."""

from __future__ import annotations

import argparse
import os
import shlex
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from memfs import control, hostmem
from memfs.qemu import VM
from memfs.qemu.qmp import QMP
from memfs.qemu.restore import CloneConfig, ensure_mount, open_snapshot

from benchlib.host import anon_in_mapping, drop_caches
from benchlib.mounts import MEMFS, umount
from benchlib.restore_guests import (FullConfig, Tail, command_times, restore_options,
                                     run_timed, timings, until_complete)
from benchlib.restore_pool import run_memfs_pool


def _read_all(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def _run_dir(work: Path, kind: str, n: int, trace: bool) -> Path:
    run = work / f"{kind}-{n}-{'trace' if trace else 'plain'}-{uuid.uuid4().hex[:4]}"
    (run / "mnt").mkdir(parents=True)
    return run


async def run_clones(kind: str, n: int, snap_dir: Path, work: Path, a: argparse.Namespace,
                     trace: bool) -> dict[str, Any]:
    """One run: ``kind`` is "qemu-full[-pool][-hot]" or "memfs[-hot]" or
    "memfs-pool[-cold]"."""
    drop_caches()
    if kind.startswith("memfs-pool"):
        return await run_memfs_pool(kind, n, snap_dir, work, a, trace)
    if kind.startswith("memfs"):
        return await run_memfs(kind, n, snap_dir, work, a, trace)
    return await run_full(kind, n, snap_dir, work, a)


async def run_full(kind: str, n: int, snap_dir: Path, work: Path,
                   a: argparse.Namespace) -> dict[str, Any]:
    """QEMU's own restore: N QEMUs, anonymous RAM, the full stream (-pool:
    the clock starts once the QEMUs are up and waiting)."""
    snap = open_snapshot(str(snap_dir))
    run = _run_dir(work, kind, n, False)
    out: dict[str, Any] = {"kind": kind, "clones": n, "trace": False}
    hot = "-hot" in kind
    if hot:
        _read_all(snap_dir / "full.stream")   # the stream in the page cache
    t0 = time.monotonic()
    async with AsyncExitStack() as stack:
        vms = []
        for i in range(n):
            cfg = FullConfig(CloneConfig(snap, str(run / "mnt"), f"full{i}"))
            vms.append(await stack.enter_async_context(VM.start(cfg, run)))  # type: ignore
        if "-pool" in kind:
            drop_caches()
            if hot:
                _read_all(snap_dir / "full.stream")
            t0 = time.monotonic()
        conts: list[float] = [0.0] * n

        async def one(i: int, vm: VM) -> None:
            await vm.qmp.execute("migrate-incoming", {
                "uri": "exec:cat " + shlex.quote(str(snap_dir / "full.stream"))})
            with trio.fail_after(600):
                while (await vm.qmp.execute("query-status"))["status"] == "inmigrate":
                    await trio.sleep(0.002)
            await vm.qmp.execute("cont")
            conts[i] = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i, vm in enumerate(vms):
                nursery.start_soon(one, i, vm)
        out["resumed_s"] = round(max(conts) - t0, 3)
        await trio.sleep(a.seconds)
        per = [timings(vm.console, t0, conts[i], a.tick / 1000) for i, vm in enumerate(vms)]
        out["first_tick_s"] = max(p["first_tick_s"] for p in per)
        out["full_speed_s"] = max(p["full_speed_s"] for p in per)
        out["per_clone"] = per
        out["qemu_rss"] = sum(hostmem.rss_bytes(vm.pid) for vm in vms)
        for vm in vms:
            try:
                await vm.qmp.execute("quit", timeout=5)
            except Exception:
                pass
    return out


async def run_memfs(kind: str, n: int, snap_dir: Path, work: Path, a: argparse.Namespace,
                    trace: bool) -> dict[str, Any]:
    """The restore command, timed from its start to each clone's first tick."""
    snap = open_snapshot(str(snap_dir))
    hot = kind.endswith("-hot")
    run = _run_dir(work, kind, n, trace)
    mnt, store, rdir = run / "mnt", run / "store", run / "run"
    out: dict[str, Any] = {"kind": kind, "clones": n, "trace": trace}
    if hot:
        # a restore server: the mount is up and has the whole snapshot in the
        # page cache before the restore command
        await trio.to_thread.run_sync(lambda: ensure_mount(
            snap, str(mnt), trace=trace, extra=["--store", str(store)]))
        await until_complete(mnt)
    cmd = [*MEMFS, "restore", str(snap_dir), "--mount", str(mnt),
           "--clones", str(n), "--run-dir", str(rdir), "--name", "m", "--store", str(store),
           *restore_options(a, trace)]
    tails = [Tail(rdir / f"m{i}.console") for i in range(n)]
    try:
        t0, t_end, rep, per = await run_timed("memfs restore", cmd, tails, a.seconds,
                                              a.tick / 1000)
        clones = rep["clones"]
        out.update(_memfs_times(rep, t0, t_end, per))
        out["per_clone"] = per
        out["host"] = await _host(mnt, store, snap, clones)
        out["qemu_rss"] = sum(hostmem.rss_bytes(c["pid"]) for c in clones)
        for c in clones:
            try:
                async with QMP.connect(c["qmp"], timeout=5) as q:
                    await q.execute("quit", timeout=5)
            except Exception:
                os.kill(c["pid"], 9)
    finally:
        await trio.sleep(0.5)
        umount(mnt)
    return out


def _memfs_times(rep: dict[str, Any], t0: float, t_end: float,
                 per: list[dict[str, float]]) -> dict[str, Any]:
    """The command's steps (restore_guests.command_times), its end and the
    NIC replug."""
    t = rep["t"]
    marks = [("interpreter+imports", t["start"]),
             ("restore's imports", t.get("imported", t["start"])),
             ("check snapshot", t["checked"]),
             ("mount", t.get("mounted", t["checked"])),
             ("start QEMUs", t["qemu_started"]), ("load state+cont", t["resumed"])]
    macs = [c.get("mac_s") for c in rep["clones"] if c.get("mac_s") is not None]
    return {**command_times(rep, t0, per, marks), "command_s": round(t_end - t0, 3),
            "mac_s": max(macs) if macs else None}


async def _host(mnt: Path, store: Path, snap: Any, clones: list[dict[str, Any]]) -> dict[str, Any]:
    region = str(mnt / "ram0")
    others = [str(p) for p in store.rglob("*") if p.is_file()]
    others.append(snap.manifest.volume["uri"])
    hm = await trio.to_thread.run_sync(hostmem.measure, str(mnt), "ram0", others)
    written = sum(anon_in_mapping(c["pid"], region) for c in clones)
    st = control.read_stats(mnt)
    return {**hm.as_dict(), "clones_wrote": written, "clones_total": hm.total + written,
            "pages_remote": st.get("pages_remote")}
