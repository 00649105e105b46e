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
migrated state) and a new MAC on each NIC, which the running guest sees
because the NIC is unplugged and plugged again with it (memfs.qemu.nic; see
docs/snapshot.rst for what else to change).

The command is on the critical path of a clone's first tick, so it does
nothing twice: the mount is a fork of this process (its imports done, the
snapshot already checked), the QEMUs start at once, and the device state's
end is a MIGRATION event, not a poll.

The mount's working-set trace (written beside the page map when it is
unmounted) is fetched first by the next restore's mount.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import trio

from .. import control
from ..daemon import Daemon, MountOptions, check_mountpoint
from ..detach import Ready, run_detached
from ..logs import RUN_DIR, open_log
from ..pagemap import PageMap
from ..report import error_line, unwrap
from ..snapshot import DEVICES, PAGEMAP, Manifest, SnapshotError
from ..trace import Trace
from .nic import Nic, check_replaceable, clone_nic, replace_nics, set_links
from .plain import set_capabilities
from .props import join_props, parse_props
from .qmp import QMP, QMPClosed
from .vm import VM

__all__ = ["Snapshot", "Identity", "CloneConfig", "clone_argv", "open_snapshot",
           "resume_clone", "prepare_clone", "load_devices", "load_clone", "restore_clones",
           "ensure_mount", "launch_clone", "started", "TRACE"]

TRACE = PAGEMAP + ".trace"
#: the name QEMU knows the device state's fd by (getfd, migrate-incoming fd:)
DEVICES_FD = "memfs-devices"
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


@dataclass
class Identity:
    """A clone's own vmgenid GUID and NICs (filled by clone_argv);
    ``keep_mac``: the NICs keep the snapshot's MACs."""

    guid: str = field(default_factory=lambda: str(uuid.uuid4()))
    nics: list[Nic] = field(default_factory=list)
    keep_mac: bool = False

    @property
    def macs(self) -> list[str]:
        return [n.mac for n in self.nics]


def clone_argv(snap: Snapshot, mount: str, name: str, qmp_path: str, ident: Identity,
               serial: str | None = None, console_log: str | None = None) -> list[str]:
    """The source's QEMU command line, turned into a clone's: RAM from the
    mount (share=off), its own name and QMP socket, ``-S -incoming defer``,
    a new vmgenid GUID and, unless ``ident.keep_mac``, new MACs and an id on
    each NIC (filled into ``ident.nics``); ``serial``, a unix socket path,
    replaces a ``-serial stdio`` (``console_log``: a file that gets all it
    printed)."""
    argv = list(snap.manifest.qemu["argv"])
    backends = {int(b["arg"]): region for region, b in snap.manifest.qemu["backends"].items()}
    out = [argv[0]]
    tail: list[str] = []
    i = 1
    ident.nics.clear()
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
            elif a == "-device" and any(k == "netdev" for k, _ in parse_props(v)) \
                    and not ident.keep_mac:
                nic = clone_nic(v, len(ident.nics))
                ident.nics.append(nic)
                v = nic.device
            elif a == "-nic" and not ident.keep_mac:
                raise SnapshotError(
                    f"the saved guest's NIC -nic {v} has no id to replace it by, so a clone "
                    "cannot get a new MAC: start the source with -netdev ...,id=N -device "
                    "...,netdev=N,id=ID (or restore with --keep-mac)")
            elif a == "-serial" and v == "stdio" and serial is not None:
                chardev = f"socket,id=memfs-serial,path={serial},server=on,wait=off"
                if console_log:
                    chardev += f",logfile={console_log}"
                tail += ["-chardev", chardev]
                v = "chardev:memfs-serial"
            out += [a, v]
            i += 2
            continue
        out.append(a)
        i += 1
    return out + tail + ["-name", name, "-qmp", f"unix:{qmp_path},server=on,wait=off",
                         "-S", "-incoming", "defer"]


def launch_clone(snap: Snapshot, mnt: str, run_dir: str, name: str,
                 ident: Identity) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start one clone as a daemonized QEMU waiting with -incoming defer, its
    serial console on a socket and logged, its pid in a file: the process
    (it exits once QEMU waits: started()) and what a report says of the clone."""
    path = os.path.join(run_dir, name)
    argv = clone_argv(snap, mnt, name, path + ".qmp", ident, serial=path + ".serial",
                      console_log=path + ".console")
    argv += ["-daemonize", "-pidfile", path + ".pid"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return proc, {"name": name, "qmp": path + ".qmp", "serial": path + ".serial",
                  "console": path + ".console", "vmgenid": ident.guid, "macs": ident.macs}


def started(proc: subprocess.Popen[str], info: dict[str, Any]) -> None:
    """Until a launched clone waits, its pid then in ``info``; SnapshotError
    with QEMU's own words if it did not start."""
    err = proc.communicate()[1]
    if proc.returncode:
        raise SnapshotError(f"QEMU for {info['name']} did not start: "
                            + " ".join(err.split())[:300])
    with open(info["qmp"].removesuffix(".qmp") + ".pid") as f:
        info["pid"] = int(f.read())


@dataclass
class CloneConfig:
    """What VM.start needs to start a clone (serial console on stdio)."""

    snap: Snapshot
    mount: str
    name: str
    ident: Identity = field(default_factory=Identity)
    #: seconds: the device state loaded; the NICs replaced (after the resume)
    load_s: float = 0.0
    mac_s: float = 0.0

    def argv(self, qmp_path: str) -> list[str]:
        return clone_argv(self.snap, self.mount, self.name, qmp_path, self.ident)


async def resume_clone(qmp: QMP, devices: str, timeout: float = 120.0,
                       nics: Sequence[Nic] = ()) -> float:
    """Drive a QEMU started with ``-incoming defer``: the device state from
    ``devices`` (x-ignore-shared), then ``cont``; ``nics`` (to be replaced
    after the resume) must be hotpluggable and go on with their link down.
    Returns seconds spent loading the device state."""
    await prepare_clone(qmp, nics)
    return await load_clone(qmp, devices, timeout, nics)


async def prepare_clone(qmp: QMP, nics: Sequence[Nic] = ()) -> None:
    """What resume_clone checks and sets before the load: done ahead of time
    for a clone that waits in a pool (memfs.qemu.pool)."""
    status = (await qmp.execute("query-status"))["status"]
    if status != "inmigrate":
        raise SnapshotError(f"QEMU {qmp.path} is {status!r}, not waiting for a migration "
                            "(start it with -incoming defer)")
    if nics:
        await check_replaceable(qmp, nics)
    await set_capabilities(qmp, x_ignore_shared=True, events=True)


async def load_clone(qmp: QMP, devices: str, timeout: float = 120.0,
                     nics: Sequence[Nic] = ()) -> float:
    """The device state into a prepared clone, then ``cont``: seconds loading."""
    loaded = await load_devices(qmp, devices, timeout, nics)
    await qmp.execute("cont")
    return loaded


async def load_devices(qmp: QMP, devices: str, timeout: float = 120.0,
                       nics: Sequence[Nic] = ()) -> float:
    """The device state into a prepared clone, which stays paused (it was
    started with -S) with the links of ``nics`` down, so that no frame
    leaves with the snapshot's MAC: seconds loading.  A pool does this
    while the clone waits, leaving only ``cont`` for the request.  QEMU
    reads the file from an fd it was handed (no ``exec:cat``: 9-15 ms of
    spawning a shell and cat here)."""
    t0 = time.monotonic()
    await qmp.send_file(DEVICES_FD, devices)
    await qmp.execute("migrate-incoming", {"uri": "fd:" + DEVICES_FD})
    try:
        with trio.fail_after(timeout):
            await _loaded(qmp)
    except (QMPClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        raise SnapshotError(f"QEMU {qmp.path} exited while loading the device state "
                            f"{devices}") from None
    loaded = time.monotonic() - t0
    if nics:
        await set_links(qmp, nics, False)
    return loaded


async def _loaded(qmp: QMP) -> None:
    """Until the incoming migration ends: its MIGRATION event (a status
    poll every 50 ms in case the event is missed)."""
    while True:
        status = ""
        with trio.move_on_after(0.05):
            status = (await qmp.wait_event("MIGRATION", timeout=None))["data"]["status"]
        if not status:
            info = await qmp.execute("query-migrate")
            status = info.get("status", "")
            if status not in ("failed", "completed") and \
                    (await qmp.execute("query-status"))["status"] != "inmigrate":
                return
        if status == "completed":
            return
        if status == "failed":
            info = await qmp.execute("query-migrate")
            raise SnapshotError(f"QEMU {qmp.path} refused the device state: "
                                f"{info.get('error-desc', 'migration failed')}")


def ensure_mount(snap: Snapshot, mnt: str, trace: bool = True,
                 extra: Sequence[str] = (), fork: bool = False,
                 store: str | None = None, prefetch: bool = True,
                 prefetch_rate: float | None = None,
                 prefetch_delay: float | None = None) -> bool:
    """Serve the snapshot at ``mnt``: mount it (a daemon, with the snapshot's
    working-set trace fetched first when there is one and ``trace``), or use
    the memfs mount already there if its regions match.  Returns True if it
    mounted.  ``fork``: the daemon is a fork of this process with default
    options, ``store`` and the background completion (``prefetch``,
    ``prefetch_rate`` bytes/s, ``prefetch_delay``: started once the clones'
    first faults paused that many seconds), not ``memfs mount`` with
    ``extra``: no second interpreter; only outside trio.run and with no
    other thread running."""
    mnt = os.path.abspath(mnt)
    if os.path.ismount(mnt) and os.path.exists(control.meta_path(mnt, "control")):
        _check_mount(snap, mnt)
        return False
    first, out = None, snap.trace + ".untraced"
    if trace and os.path.exists(snap.trace):
        # keep the first trace: a later one lacks what the trace prefetched
        first, out = snap.trace, snap.trace + ".last"
    elif trace:
        out = None   # the first mount's trace goes beside the page map
    if fork:
        _mount_forked(snap, mnt, first, out, store, prefetch, prefetch_rate, prefetch_delay)
        return True
    args = [snap.pagemap_path, mnt, *extra, *(["--store", store] if store else [])]
    args += (["--prefetch-trace", first] if first else []) + (["--trace-out", out] if out else [])
    res = subprocess.run([sys.executable, "-m", "memfs.cli", "mount", *args],
                         capture_output=True, text=True)
    if res.returncode:
        raise SnapshotError(res.stderr.strip().removeprefix("memfs: ") or
                            f"memfs mount exited with {res.returncode}")
    return True


def _check_mount(snap: Snapshot, mnt: str) -> None:
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


def _mount_forked(snap: Snapshot, mnt: str, first: str | None, out: str | None,
                  store: str | None, prefetch: bool, prefetch_rate: float | None,
                  prefetch_delay: float | None = None) -> None:
    """The mount as a fork of this process, as ``memfs mount`` would make it
    with its default options: the imports are done and the page map is
    loaded and checked, so the daemon serves some hundred ms sooner than a
    new interpreter would."""
    opts = MountOptions(mountpoint=mnt, pagemap=snap.pagemap, pagemap_path=snap.pagemap_path,
                        store_dir=store, bdi_max_ratio=50, bdi_strict_limit=0,
                        prefetch_trace=first, trace_out=out, prefetch=prefetch,
                        prefetch_rate=prefetch_rate, prefetch_delay=prefetch_delay)
    try:
        check_mountpoint(mnt)
        if first:
            Trace.load(first)
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        logfile = os.path.join(RUN_DIR, mnt.strip("/").replace("/", "-") + ".log")
        open_log(logfile).close()
    except Exception as e:
        raise SnapshotError(f"mount failed: {error_line(unwrap(e))}") from None

    def work(ready: Ready) -> int:
        trio.run(Daemon(opts).run, lambda: ready(str(os.getpid())))
        return 0
    ok, msg = run_detached(work, logfile, False)
    if not ok:
        raise SnapshotError(f"mount failed: {msg or 'daemon died; see ' + logfile}")


@asynccontextmanager
async def restore_clones(snap: Snapshot, mount: str, n: int, workdir: str,
                         prefix: str = "clone", keep_mac: bool = False
                         ) -> AsyncIterator[list[VM]]:
    """Start ``n`` clones (VM objects: console on stdio, QMP connected; each
    ``vm.config`` a CloneConfig), resume them all at once and give their
    NICs the new MACs; they are quit when the block ends."""
    async with AsyncExitStack() as stack:
        vms = []
        for i in range(n):
            cfg = CloneConfig(snap, mount, f"{prefix}{i}", Identity(keep_mac=keep_mac))
            vms.append(await stack.enter_async_context(VM.start(cfg, workdir)))  # type: ignore[arg-type]

        async def one(vm: VM) -> None:
            cfg: CloneConfig = vm.config  # type: ignore[assignment]
            cfg.load_s = await resume_clone(vm.qmp, snap.devices, nics=cfg.ident.nics)
            if cfg.ident.nics:
                cfg.mac_s = await replace_nics(vm.qmp, cfg.ident.nics)
        async with trio.open_nursery() as nursery:
            for vm in vms:
                nursery.start_soon(one, vm)
        yield vms
