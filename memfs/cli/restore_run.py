"""``memfs restore``'s work: the command line of memfs.qemu.restore.

Why apart from memfs.cli.restore: that module is imported for every
command, and this one's imports (trio, QEMU, the daemon for a forked mount)
cost a tenth of a second or more.

The command does more than the library (daemonized QEMUs with serial
sockets and console logs, pid files, undoing a half-done restore, driving
QEMUs someone else started) and reports when it did what, in the host's
monotonic clock (``t``), so that a caller can line its steps up with the
clones' consoles: the restore command is on the path to a clone's first
tick.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

import trio

from ..report import parse_size
from .common import option
from ..snapshot import SnapshotError
from ..qemu.nic import Nic, replace_nics
from ..qemu.props import join_props, parse_props
from ..qemu.qmp import QMP, QMPError, unwrap_single
from ..qemu.restore import (Identity, Snapshot, clone_argv, ensure_mount, launch_clone,
                            open_snapshot, resume_clone, started)

__all__ = ["run"]


async def _drive(clones: Sequence[dict[str, Any]], devices: str,
                 nics: dict[str, list[Nic]], mac_delay: float) -> None:
    """Resume every clone at once; ``mac_delay`` seconds later give each its
    NICs' new MACs (the guest's hotplug work then does not delay its first
    steps after the resume)."""
    async def one(c: dict[str, Any]) -> None:
        async with QMP.connect(c["qmp"], timeout=10) as q:
            c["load_s"] = round(await resume_clone(q, devices, nics=nics[c["name"]]), 3)
            c["t_cont"] = time.monotonic()
            if nics[c["name"]]:
                await trio.sleep(mac_delay)
                c["mac_s"] = round(await replace_nics(q, nics[c["name"]]), 3)
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            for c in clones:
                nursery.start_soon(one, c)


async def _drive_external(socks: Sequence[str], snap: Snapshot, mnt: str,
                          keep_mac: bool, mac_delay: float) -> list[dict[str, Any]]:
    """QEMUs started from --print-args: their NICs are found by the ids the
    printed lines gave them, with the MACs those lines chose."""
    clones: list[dict[str, Any]] = [{"name": os.path.basename(s).removesuffix(".qmp"),
                                     "qmp": s} for s in socks]
    nics: dict[str, list[Nic]] = {}

    async def find(c: dict[str, Any]) -> None:
        async with QMP.connect(c["qmp"], timeout=10) as q:
            ident = Identity(keep_mac=keep_mac)
            clone_argv(snap, mnt, "x", c["qmp"], ident)
            for nic in ident.nics:
                try:
                    nic.mac = await q.execute("qom-get", {
                        "path": f"/machine/peripheral/{nic.id}", "property": "mac"})
                except QMPError as e:
                    raise SnapshotError(f"QEMU {c['qmp']}: NIC {nic.id}: {e.desc} (start it "
                                        "from memfs restore --print-args)") from None
                nic.device = join_props([(k, v) for k, v in parse_props(nic.device)
                                         if k != "mac"] + [("mac", nic.mac)])
            nics[c["name"]] = ident.nics
            c["macs"] = ident.macs
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            for c in clones:
                nursery.start_soon(find, c)
    await _drive(clones, snap.devices, nics, mac_delay)
    return clones


def run(a: argparse.Namespace, t: dict[str, float]) -> int:
    if a.clones < 1:
        print("memfs: restore: --clones must be 1 or more", file=sys.stderr)
        return 2
    if not a.mount:
        print("memfs: restore: --mount MNT is needed (or --pool SOCK)", file=sys.stderr)
        return 2
    ways = [w for w, on in (("--qmp", a.qmp), ("--print-args", a.print_args),
                            ("--serve", a.serve)) if on]
    if len(ways) > 1:
        print(f"memfs: restore: {' and '.join(ways)} exclude each other (--qmp drives QEMUs "
              "already started, --print-args starts none, --serve starts its own)",
              file=sys.stderr)
        return 2
    rate = option("--prefetch-rate", parse_size, a.prefetch_rate)
    try:
        snap = open_snapshot(a.dir)
        t["checked"] = time.monotonic()
        if not snap.manifest.qemu.get("vmgenid"):
            print("memfs: restore: warning: the saved guest has no vmgenid device: its "
                  "clones cannot learn that they are clones (start guests with "
                  "-device vmgenid)", file=sys.stderr)
        mnt = os.path.abspath(a.mount)
        if a.qmp:
            return _run_external(a, snap, mnt, t)
        run_dir = os.path.abspath(a.run_dir or os.path.join(snap.dir, "run"))
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        if a.serve:
            from .restore_serve import serve
            return serve(a, snap, mnt, run_dir, rate)
        names = [f"{a.name}{i}" for i in range(a.clones)]
        if a.print_args:
            ensure_mount(snap, mnt, trace=not a.no_trace, fork=True,
                         prefetch_delay=a.prefetch_delay)
            for name in names:
                ident = Identity(keep_mac=a.keep_mac)
                print(shlex.join(clone_argv(snap, mnt, name,
                                            os.path.join(run_dir, name + ".qmp"), ident)))
            return 0
        mounted = ensure_mount(snap, mnt, trace=not a.no_trace, fork=True, store=a.store,
                               prefetch=not a.no_prefetch, prefetch_rate=rate,
                               prefetch_delay=a.prefetch_delay)
        t["mounted"] = time.monotonic()
        clones: list[dict[str, Any]] = []
        try:
            _start_clones(snap, mnt, run_dir, names, clones, a.keep_mac, t, a.mac_delay)
        except BaseException:
            undo(run_dir, clones, mnt if mounted else None)
            raise
        _report(mnt, t, clones)
        return 0
    except trio.TooSlowError:
        print("memfs: restore failed: timed out (a QEMU's QMP socket, or loading the device "
              "state)", file=sys.stderr)
        return 1
    except (SnapshotError, QMPError, OSError) as e:
        print(f"memfs: restore failed: {e or type(e).__name__}", file=sys.stderr)
        return 1


def _run_external(a: argparse.Namespace, snap: Snapshot, mnt: str, t: dict[str, float]) -> int:
    """--qmp: QEMUs someone else started from --print-args."""
    mounted = ensure_mount(snap, mnt, trace=not a.no_trace, fork=True,
                           prefetch_delay=a.prefetch_delay)
    t["mounted"] = time.monotonic()
    try:
        clones = trio.run(_drive_external, a.qmp, snap, mnt, a.keep_mac, a.mac_delay)
    except BaseException:
        undo("", [], mnt if mounted else None)
        raise
    t["resumed"] = max(c["t_cont"] for c in clones)
    _report(mnt, t, clones)
    return 0


def _report(mnt: str, t: dict[str, float], clones: list[dict[str, Any]]) -> None:
    """What was done and when (host monotonic clock), on stdout as JSON."""
    print(json.dumps({"mount": mnt, "seconds": round(time.monotonic() - t["start"], 3),
                      "t": t, "clones": clones}, indent=1))


def _start_clones(snap: Snapshot, mnt: str, run_dir: str, names: Sequence[str],
                  clones: list[dict[str, Any]], keep_mac: bool, t: dict[str, float],
                  mac_delay: float = 0.0) -> None:
    """Start daemonized QEMUs, all at once (appended to ``clones`` as they
    are started), and resume them all."""
    procs, nics = [], {}
    for name in names:
        ident = Identity(keep_mac=keep_mac)
        proc, info = launch_clone(snap, mnt, run_dir, name, ident)
        procs.append(proc)
        nics[name] = ident.nics
        clones.append(info)
    failed = []
    for proc, info in zip(procs, clones):
        try:
            started(proc, info)
        except SnapshotError as e:
            failed.append(e)
    if failed:
        raise failed[0]
    t["qemu_started"] = time.monotonic()
    trio.run(_drive, clones, snap.devices, nics, mac_delay)
    t["resumed"] = max(c["t_cont"] for c in clones)


def undo(run_dir: str, clones: Sequence[dict[str, Any]], mounted: str | None) -> None:
    """A restore that failed half way: the QEMUs it started are killed (by
    their pid files) and a mount it made is unmounted."""
    for c in clones:
        try:
            with open(os.path.join(run_dir, c["name"] + ".pid")) as f:
                os.kill(int(f.read()), 9)
        except (OSError, ValueError):
            pass
    if mounted:
        time.sleep(0.3)
        subprocess.run([sys.executable, "-m", "memfs.cli", "umount", mounted],
                       capture_output=True, timeout=120)
