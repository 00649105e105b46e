"""``memfs restore``: start guests from a snapshot; their RAM arrives on first touch.

One memfs mount serves the snapshot's page map; every clone's QEMU maps the
region file with ``share=off`` (a private mapping): the pages a clone reads
sit once in the host page cache, shared by all clones, and a page a clone
writes becomes its own anonymous copy, which no other clone and not the
mount ever sees.  Each QEMU starts with ``-incoming defer`` and the source's
command line (recorded in the manifest), gets the device state with
``x-ignore-shared`` (the stream holds no RAM) and runs at once.

Each clone gets a new identity where the guest can see it: a new
``vmgenid`` GUID (the guest kernel reseeds its RNG when it changes; the
source must have had ``-device vmgenid``, whose ACPI table is in the
migrated state) and a new ``mac=`` on each NIC on the command line (see
docs/snapshot.rst for what the device state keeps and what else to change).

The mount's working-set trace (written beside the page map when it is
unmounted) is fetched first by the next restore's mount.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import trio

from .. import control
from ..pagemap import PageMap
from ..snapshot import DEVICES, PAGEMAP, Manifest, SnapshotError
from .plain import set_capabilities
from .qmp import QMP, QMPClosed, QMPError, unwrap_single
from .snapshot import join_props, parse_props
from .vm import VM

__all__ = ["Snapshot", "CloneConfig", "clone_argv", "open_snapshot", "resume_clone",
           "restore_clones", "ensure_mount", "add_parser"]

TRACE = PAGEMAP + ".trace"
_DROP_WITH_VALUE = {"-incoming", "-qmp", "-name", "-pidfile"}
_DROP = {"-S", "-daemonize"}


@dataclass
class Snapshot:
    """A checked snapshot directory."""

    dir: str
    manifest: Manifest
    pagemap: PageMap

    @property
    def devices(self) -> str:
        return os.path.join(self.dir, DEVICES)

    @property
    def pagemap_path(self) -> str:
        return os.path.join(self.dir, PAGEMAP)

    @property
    def trace(self) -> str:
        return os.path.join(self.dir, TRACE)


def open_snapshot(directory: str) -> Snapshot:
    """Load the manifest, check every file it names and the page map:
    SnapshotError (one line) for anything that does not match."""
    d = os.path.abspath(directory)
    man = Manifest.load(d)
    man.verify(d)
    return Snapshot(d, man, man.check_pagemap(d))


def new_mac() -> str:
    """A random locally administered unicast MAC."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


@dataclass
class Identity:
    guid: str = field(default_factory=lambda: str(uuid.uuid4()))
    macs: list[str] = field(default_factory=list)


def clone_argv(snap: Snapshot, mount: str, name: str, qmp_path: str, ident: Identity,
               serial: str | None = None) -> list[str]:
    """The source's QEMU command line, turned into a clone's: RAM from the
    mount (share=off), its own name and QMP socket, ``-incoming defer``, a
    new vmgenid GUID and new MACs (filled into ``ident.macs``); ``serial``
    replaces a ``-serial stdio``."""
    argv = list(snap.manifest.qemu["argv"])
    backends = {int(b["arg"]): region for region, b in snap.manifest.qemu["backends"].items()}
    out = [argv[0]]
    i = 1
    ident.macs.clear()
    while i < len(argv):
        a = argv[i]
        if a in _DROP_WITH_VALUE:
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if a in _DROP:
            i += 1
            continue
        if a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            v = argv[i + 1]  # an option with a value (QEMU's values do not start with -)
            if a == "-object" and i + 1 in backends:
                props = [(k, x) for k, x in parse_props(v)
                         if k not in ("mem-path", "share", "prealloc", "discard-data")]
                props[0] = ("", "memory-backend-file")
                props += [("mem-path", os.path.join(mount, backends[i + 1])), ("share", "off")]
                v = join_props(props)
            elif a == "-device" and parse_props(v)[0][1] == "vmgenid":
                v = join_props([(k, x) for k, x in parse_props(v) if k != "guid"]
                               + [("guid", ident.guid)])
            elif (a == "-device" and any(k == "netdev" for k, _ in parse_props(v))) \
                    or a == "-nic":
                mac = new_mac()
                ident.macs.append(mac)
                v = join_props([(k, x) for k, x in parse_props(v) if k != "mac"]
                               + [("mac", mac)])
            elif a == "-serial" and v == "stdio" and serial is not None:
                v = serial
            out += [a, v]
            i += 2
            continue
        out.append(a)
        i += 1
    return out + ["-name", name, "-qmp", f"unix:{qmp_path},server=on,wait=off",
                  "-incoming", "defer"]


@dataclass
class CloneConfig:
    """What VM.start needs to start a clone (serial console on stdio)."""

    snap: Snapshot
    mount: str
    name: str
    ident: Identity = field(default_factory=Identity)

    def argv(self, qmp_path: str) -> list[str]:
        return clone_argv(self.snap, self.mount, self.name, qmp_path, self.ident)


async def resume_clone(qmp: QMP, devices: str, timeout: float = 120.0) -> float:
    """Drive a QEMU started with ``-incoming defer``: the device state from
    ``devices`` (x-ignore-shared), then ``cont``.  Returns seconds spent
    loading the device state."""
    status = (await qmp.execute("query-status"))["status"]
    if status != "inmigrate":
        raise SnapshotError(f"QEMU {qmp.path} is {status!r}, not waiting for a migration "
                            "(start it with -incoming defer)")
    await set_capabilities(qmp, x_ignore_shared=True)
    t0 = time.monotonic()
    await qmp.execute("migrate-incoming", {"uri": "exec:cat " + shlex.quote(devices)})
    try:
        with trio.fail_after(timeout):
            while True:
                info = await qmp.execute("query-migrate")
                if info.get("status") == "failed":
                    raise SnapshotError(f"QEMU {qmp.path} refused the device state: "
                                        f"{info.get('error-desc', 'migration failed')}")
                if (await qmp.execute("query-status"))["status"] != "inmigrate":
                    break
                await trio.sleep(0.002)
    except (QMPClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        raise SnapshotError(f"QEMU {qmp.path} exited while loading the device state "
                            f"{devices}") from None
    loaded = time.monotonic() - t0
    await qmp.execute("cont")
    return loaded


def ensure_mount(snap: Snapshot, mnt: str, trace: bool = True,
                 extra: Sequence[str] = ()) -> bool:
    """Serve the snapshot at ``mnt``: mount it (a daemon, with the snapshot's
    working-set trace fetched first when there is one and ``trace``), or use
    the memfs mount already there if its regions match.  Returns True if it
    mounted."""
    mnt = os.path.abspath(mnt)
    if os.path.ismount(mnt) and os.path.exists(control.meta_path(mnt, "control")):
        st = control.read_stats(mnt)
        if not st.get("pagemap_installed"):
            raise SnapshotError(f"{mnt} is a memfs mount that serves no page map yet")
        for name, size in snap.manifest.regions.items():
            try:
                have = os.stat(os.path.join(mnt, name)).st_size
            except OSError:
                raise SnapshotError(f"{mnt} serves no region {name!r}") from None
            if have != size:
                raise SnapshotError(f"region {name}: {size} bytes in the snapshot, {have} "
                                    f"in {mnt}")
        return False
    args = [sys.executable, "-m", "memfs.cli", "mount", snap.pagemap_path, mnt, *extra]
    if trace and os.path.exists(snap.trace):
        # keep the first trace: a later one lacks what the trace prefetched
        args += ["--prefetch-trace", snap.trace, "--trace-out", snap.trace + ".last"]
    elif not trace:
        args += ["--trace-out", snap.trace + ".untraced"]
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode:
        raise SnapshotError(res.stderr.strip().removeprefix("memfs: ") or
                            f"memfs mount exited with {res.returncode}")
    return True


@asynccontextmanager
async def restore_clones(snap: Snapshot, mount: str, n: int, workdir: str,
                         prefix: str = "clone") -> AsyncIterator[list[VM]]:
    """Start ``n`` clones (VM objects: console on stdio, QMP connected) and
    resume them all at once; they are quit when the block ends."""
    async with AsyncExitStack() as stack:
        vms = []
        for i in range(n):
            cfg = CloneConfig(snap, mount, f"{prefix}{i}")
            vms.append(await stack.enter_async_context(VM.start(cfg, workdir)))  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            for vm in vms:
                nursery.start_soon(resume_clone, vm.qmp, snap.devices)
        yield vms


# -- command line ------------------------------------------------------------------

async def _drive(socks: Sequence[str], devices: str) -> None:
    async def one(sock: str) -> None:
        async with QMP.connect(sock, timeout=10) as q:
            await resume_clone(q, devices)
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            for s in socks:
                nursery.start_soon(one, s)


def cmd_restore(a: argparse.Namespace) -> int:
    if a.clones < 1:
        print("memfs: restore: --clones must be 1 or more", file=sys.stderr)
        return 2
    try:
        snap = open_snapshot(a.dir)
        if not snap.manifest.qemu.get("vmgenid"):
            print("memfs: restore: warning: the saved guest has no vmgenid device: its "
                  "clones cannot learn that they are clones (start guests with "
                  "-device vmgenid)", file=sys.stderr)
        mnt = os.path.abspath(a.mount)
        if a.qmp:
            mounted = ensure_mount(snap, mnt, trace=not a.no_trace)
            try:
                trio.run(_drive, a.qmp, snap.devices)
            except BaseException:
                _undo("", [], mnt if mounted else None)
                raise
            return 0
        run_dir = os.path.abspath(a.run_dir or os.path.join(snap.dir, "run"))
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        names = [f"{a.name}{i}" for i in range(a.clones)]
        if a.print_args:
            ensure_mount(snap, mnt, trace=not a.no_trace)
            for name in names:
                ident = Identity()
                argv = clone_argv(snap, mnt, name, os.path.join(run_dir, name + ".qmp"), ident)
                print(shlex.join(argv))
            return 0
        t0 = time.monotonic()
        mounted = ensure_mount(snap, mnt, trace=not a.no_trace)
        clones: list[dict[str, Any]] = []
        try:
            _start_clones(snap, mnt, run_dir, names, clones)
        except BaseException:
            _undo(run_dir, clones, mnt if mounted else None)
            raise
        for c in clones:
            with open(os.path.join(run_dir, c["name"] + ".pid")) as f:
                c["pid"] = int(f.read())
        print(json.dumps({"mount": mnt, "seconds": round(time.monotonic() - t0, 3),
                          "clones": clones}, indent=1))
        return 0
    except trio.TooSlowError:
        print("memfs: restore failed: timed out (a QEMU's QMP socket, or loading the device "
              "state)", file=sys.stderr)
        return 1
    except (SnapshotError, QMPError, OSError) as e:
        print(f"memfs: restore failed: {e or type(e).__name__}", file=sys.stderr)
        return 1


def _start_clones(snap: Snapshot, mnt: str, run_dir: str, names: Sequence[str],
                  clones: list[dict[str, Any]]) -> None:
    """Start daemonized QEMUs (appended to ``clones`` as they start) and
    resume them all."""
    for name in names:
        ident = Identity()
        qmp = os.path.join(run_dir, name + ".qmp")
        serial = os.path.join(run_dir, name + ".serial")
        argv = clone_argv(snap, mnt, name, qmp, ident,
                          serial=f"unix:{serial},server=on,wait=off")
        argv += ["-daemonize", "-pidfile", os.path.join(run_dir, name + ".pid")]
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode:
            raise SnapshotError(f"QEMU for {name} did not start: "
                                + " ".join(res.stderr.split())[:300])
        clones.append({"name": name, "qmp": qmp, "serial": serial, "vmgenid": ident.guid,
                       "macs": ident.macs})
    trio.run(_drive, [c["qmp"] for c in clones], snap.devices)


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
        "load the device state and resume them; each clone gets a new vmgenid and MACs.")
    p.add_argument("dir", metavar="DIR", help="snapshot directory (memfs snapshot --out)")
    p.add_argument("--mount", required=True, metavar="MNT",
                   help="where the snapshot is served (mounted if it is not a memfs mount)")
    p.add_argument("--clones", type=int, default=1, metavar="N", help="how many guests (1)")
    p.add_argument("--name", default="clone", help="clone name prefix (clone)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="QMP and serial sockets, pid files (DIR/run)")
    p.add_argument("--print-args", action="store_true",
                   help="mount, print each clone's QEMU command line and stop")
    p.add_argument("--qmp", action="append", metavar="SOCK",
                   help="drive this already started -incoming defer QEMU instead; repeat")
    p.add_argument("--no-trace", action="store_true",
                   help="do not fetch the snapshot's working-set trace first")
    p.set_defaults(func=cmd_restore)
