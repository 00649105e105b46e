"""bench-restore's saved state: the test guest booted on a memfs source
mount and saved by memfs snapshot, and the very same stopped state as a
QEMU migration stream that carries all RAM (QEMU's own full snapshot)."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path
from typing import Any

import trio

from memfs.qemu import VM, file_backend
from memfs.qemu.guest import build_guest, guest_config
from memfs.qemu.plain import MigrationWatch, set_capabilities
from memfs.qemu.restore import CloneConfig, ensure_mount, open_snapshot
from memfs.qemu.snapshot import SnapshotOptions, snapshot

from benchlib.mounts import new_mount, umount
from benchlib.restore_guests import NIC

MIB = 1 << 20


async def make_snapshot(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Save a guest both ways; what it cost and where the snapshot is."""
    snap = work / "snap"
    rep = await save_memfs(a, work, snap)
    full_s = await save_full_stream(work, snap)
    return {"snapshot": rep.__dict__, "full_stream_bytes": os.path.getsize(snap / "full.stream"),
            "full_stream_save_s": round(full_s, 3), "dir": str(snap)}


async def save_memfs(a: argparse.Namespace, work: Path, snap: Path) -> Any:
    """Boot the guest (a NIC whose driver is bound) on a source mount, fill
    it, and save it with memfs snapshot to ``snap``; the snapshot's report."""
    image = build_guest()
    ram = a.ram * MIB
    mnt = work / "src"
    mnt.mkdir()
    new_mount(mnt, ram, work / "src.vol", work / "src.store")
    try:
        cfg = guest_config(image, file_backend(mnt / "ram0", ram), "src", fill_mib=a.fill,
                           tick_ms=a.tick)
        cfg.extra_args += ["-device", "vmgenid,guid=auto"] + NIC
        async with VM.start(cfg, work) as vm:
            await vm.console.expect(r"^READY", 1800)
            await vm.console.command("macs", r"^MACS eth0=", 60)   # the NIC's driver bound
            await trio.sleep(2.0)
            opts = SnapshotOptions(qmp=None, rams=[("ram0", str(mnt / "ram0"))],
                                   volume=str(work / "snap.vol"), out=str(snap))
            rep = await snapshot(opts, vm.qmp)
            await vm.qmp.execute("quit")
    finally:
        umount(mnt)
    return rep


async def save_full_stream(work: Path, snap: Path) -> float:
    """The same state with all RAM in the stream (QEMU's own snapshot): from
    a clone loaded but not resumed (a QEMU migrates once per stop); seconds
    the save took."""
    s = open_snapshot(str(snap))
    cmnt = work / "full-mnt"
    cmnt.mkdir()
    ensure_mount(s, str(cmnt), trace=False)
    try:
        async with VM.start(CloneConfig(s, str(cmnt), "full"), work) as vm:
            await set_capabilities(vm.qmp, x_ignore_shared=True)
            await vm.qmp.execute("migrate-incoming",
                                 {"uri": "exec:cat " + shlex.quote(s.devices)})
            while (await vm.qmp.execute("query-status"))["status"] == "inmigrate":
                await trio.sleep(0.01)
            await set_capabilities(vm.qmp, x_ignore_shared=False)
            t = time.monotonic()
            watch = MigrationWatch(started=t)
            await vm.qmp.execute("migrate", {
                "uri": "exec:cat > " + shlex.quote(str(snap / "full.stream"))})
            await watch.until(vm.qmp, timeout=1800)
            full_s = time.monotonic() - t
            await vm.qmp.execute("quit")
    finally:
        umount(cmnt)
        for f in snap.glob("ram.pagemap.trace*"):
            f.unlink()
    return full_s
