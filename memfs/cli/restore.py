"""``memfs restore``: the command line of memfs.qemu.restore.

Why apart: the command does more than the library (daemonized QEMUs with
serial sockets and console logs, pid files, undoing a half-done restore,
driving QEMUs someone else started) and reports when it did what, in the
host's monotonic clock (``t``), so that a caller can line its steps up with
the clones' consoles: the restore command is on the path to a clone's first
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
from ..snapshot import SnapshotError
from ..qemu.nic import Nic, replace_nics
from ..qemu.props import join_props, parse_props
from ..qemu.qmp import QMP, QMPError, unwrap_single
from ..qemu.restore import Identity, Snapshot, clone_argv, ensure_mount, open_snapshot, resume_clone

__all__ = ["cmd_restore", "add_parser"]


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
                          keep_mac: bool) -> None:
    """QEMUs started from --print-args: their NICs are found by the ids the
    printed lines gave them, with the MACs those lines chose."""
    async def one(sock: str) -> None:
        async with QMP.connect(sock, timeout=10) as q:
            ident = Identity(keep_mac=keep_mac)
            clone_argv(snap, mnt, "x", sock, ident)
            for nic in ident.nics:
                try:
                    nic.mac = await q.execute("qom-get", {
                        "path": f"/machine/peripheral/{nic.id}", "property": "mac"})
                except QMPError as e:
                    raise SnapshotError(f"QEMU {sock}: NIC {nic.id}: {e.desc} (start it "
                                        "from memfs restore --print-args)") from None
                nic.device = join_props([(k, v) for k, v in parse_props(nic.device)
                                         if k != "mac"] + [("mac", nic.mac)])
            await resume_clone(q, snap.devices, nics=ident.nics)
            if ident.nics:
                await replace_nics(q, ident.nics)
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            for s in socks:
                nursery.start_soon(one, s)


def cmd_restore(a: argparse.Namespace) -> int:
    t = {"start": time.monotonic()}
    if a.clones < 1:
        print("memfs: restore: --clones must be 1 or more", file=sys.stderr)
        return 2
    try:
        snap = open_snapshot(a.dir)
        t["checked"] = time.monotonic()
        if not snap.manifest.qemu.get("vmgenid"):
            print("memfs: restore: warning: the saved guest has no vmgenid device: its "
                  "clones cannot learn that they are clones (start guests with "
                  "-device vmgenid)", file=sys.stderr)
        mnt = os.path.abspath(a.mount)
        if a.qmp:
            mounted = ensure_mount(snap, mnt, trace=not a.no_trace, fork=True,
                                   prefetch_delay=a.prefetch_delay)
            try:
                trio.run(_drive_external, a.qmp, snap, mnt, a.keep_mac)
            except BaseException:
                _undo("", [], mnt if mounted else None)
                raise
            return 0
        run_dir = os.path.abspath(a.run_dir or os.path.join(snap.dir, "run"))
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
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
                               prefetch=not a.no_prefetch, prefetch_rate=_rate(a),
                               prefetch_delay=a.prefetch_delay)
        t["mounted"] = time.monotonic()
        clones: list[dict[str, Any]] = []
        try:
            _start_clones(snap, mnt, run_dir, names, clones, a.keep_mac, t, a.mac_delay)
        except BaseException:
            _undo(run_dir, clones, mnt if mounted else None)
            raise
        for c in clones:
            with open(os.path.join(run_dir, c["name"] + ".pid")) as f:
                c["pid"] = int(f.read())
        print(json.dumps({"mount": mnt, "seconds": round(time.monotonic() - t["start"], 3),
                          "t": t, "clones": clones}, indent=1))
        return 0
    except trio.TooSlowError:
        print("memfs: restore failed: timed out (a QEMU's QMP socket, or loading the device "
              "state)", file=sys.stderr)
        return 1
    except (SnapshotError, QMPError, OSError) as e:
        print(f"memfs: restore failed: {e or type(e).__name__}", file=sys.stderr)
        return 1


def _rate(a: argparse.Namespace) -> float | None:
    if a.prefetch_rate is None:
        return None
    try:
        return float(parse_size(a.prefetch_rate))
    except ValueError as e:
        raise SnapshotError(f"--prefetch-rate {a.prefetch_rate}: {e}") from None


def _start_clones(snap: Snapshot, mnt: str, run_dir: str, names: Sequence[str],
                  clones: list[dict[str, Any]], keep_mac: bool, t: dict[str, float],
                  mac_delay: float = 0.0) -> None:
    """Start daemonized QEMUs, all at once (appended to ``clones`` as they
    are started), and resume them all."""
    procs, nics = [], {}
    for name in names:
        ident = Identity(keep_mac=keep_mac)
        path = os.path.join(run_dir, name)
        argv = clone_argv(snap, mnt, name, path + ".qmp", ident, serial=path + ".serial",
                          console_log=path + ".console")
        argv += ["-daemonize", "-pidfile", path + ".pid"]
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
        nics[name] = ident.nics
        clones.append({"name": name, "qmp": path + ".qmp", "serial": path + ".serial",
                       "console": path + ".console", "vmgenid": ident.guid,
                       "macs": ident.macs})
    failed = []
    for name, p in zip(names, procs):
        err = p.communicate()[1]
        if p.returncode:
            failed.append(f"QEMU for {name} did not start: " + " ".join(err.split())[:300])
    if failed:
        raise SnapshotError(failed[0])
    t["qemu_started"] = time.monotonic()
    trio.run(_drive, clones, snap.devices, nics, mac_delay)
    t["resumed"] = max(c["t_cont"] for c in clones)


def _undo(run_dir: str, clones: Sequence[dict[str, Any]], mounted: str | None) -> None:
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore", help="start guests from a snapshot; RAM arrives on first touch",
        description="Check the snapshot, mount its page map (or use the mount at --mount), "
        "start --clones QEMUs with -incoming defer mapping the region with share=off, "
        "load the device state and resume them; each clone gets a new vmgenid, and its "
        "NICs are replugged with new MACs that the running guest sees.")
    p.add_argument("dir", metavar="DIR", help="snapshot directory (memfs snapshot --out)")
    p.add_argument("--mount", required=True, metavar="MNT",
                   help="where the snapshot is served (mounted if it is not a memfs mount)")
    p.add_argument("--clones", type=int, default=1, metavar="N", help="how many guests (1)")
    p.add_argument("--name", default="clone", help="clone name prefix (clone)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="QMP and serial sockets, console logs, pid files (DIR/run)")
    p.add_argument("--print-args", action="store_true",
                   help="mount, print each clone's QEMU command line and stop")
    p.add_argument("--qmp", action="append", metavar="SOCK",
                   help="drive this already started -incoming defer QEMU instead; repeat")
    p.add_argument("--no-trace", action="store_true",
                   help="do not fetch the snapshot's working-set trace first")
    p.add_argument("--store", metavar="DIR",
                   help="local store directory of the mount it makes (default: temporary)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="the mount it makes fetches only what the clones touch")
    p.add_argument("--prefetch-rate", metavar="BYTES/S",
                   help="limit the background completion of the mount it makes (e.g. 100M)")
    p.add_argument("--prefetch-delay", type=float, default=0.5, metavar="S",
                   help="the mount it makes starts its background completion (the "
                        "working-set trace first) once the clones' first faults paused S "
                        "seconds (0.5; 0: at once, competing with them)")
    p.add_argument("--keep-mac", action="store_true",
                   help="the clones' NICs keep the snapshot's MACs (no replug: for a "
                        "guest without PCI hotplug, or NICs on a bus without it)")
    p.add_argument("--mac-delay", type=float, default=0.5, metavar="S",
                   help="seconds between the resume and the NIC replug (0.5): the guest's "
                        "hotplug work would delay its first steps")
    p.set_defaults(func=cmd_restore)
