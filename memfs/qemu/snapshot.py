"""``memfs snapshot``: save a running QEMU guest into a snapshot directory.

The guest's RAM is a shared file: a file in a memfs source mount (``memfs
mount --new ... --volume``) or a /dev/shm file.  The steps:

1. while the guest runs: one pass that copies what it has written so far —
   on a memfs mount a ``sync`` (no RAM is read), else a full ``capture``
   to the snapshot's volume;
2. ``stop``; at the same time the final pass (a mount's ``flush``, or a
   capture based on pass 1 that rewrites only changed pages) and the device
   state alone, with ``x-ignore-shared``, to ``DIR/devices`` through
   ``exec:cat`` (QEMU 7.2 has no ``file:`` migration);
3. ``--resume``: ``cont``; the guest was paused only for step 2;
4. a memfs mount rewrites its volume in place as its guest goes on, so its
   pages are copied to the snapshot's own volume (after the resume: the
   mount's background copy is paused meanwhile, the final pass is not);
5. the manifest (memfs.snapshot), naming the files with their checksums,
   the volume with its identity, and the QEMU command line restore needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import trio

from .. import control
from .. import volume as volumes
from ..capture import parse_ram_args
from ..pagemap import PageMap
from ..snapshot import (DEVICES, PAGEMAP, Manifest, SnapshotError, check_new_volume,
                        rebase_volume)
from .passes import MountPasses, PassError, ReadPasses
from .props import join_props, parse_props
from .plain import MigrationWatch, set_capabilities
from .qmp import QMP, QMPError

__all__ = ["SnapshotOptions", "snapshot", "qemu_pid", "find_backends", "add_parser",
           "parse_props", "join_props"]


@dataclass
class SnapshotOptions:
    qmp: str | None
    rams: list[tuple[str, str]]
    volume: str
    out: str
    resume: bool = False
    timeout: float = 300.0


@dataclass
class SnapshotReport:
    #: from ``stop`` to ``cont`` (``--resume``) or to the end of the final pass
    paused_ms: float = 0.0
    total_ms: float = 0.0
    device_bytes: int = 0
    volume_bytes: int = 0
    source: str = ""
    steps_ms: dict[str, float] = field(default_factory=dict)


def qemu_pid(qmp: QMP) -> int:
    """The pid of the QEMU at the other end of a QMP unix socket (SO_PEERCRED):
    its command line is what a restore must repeat."""
    sock = qmp._stream.socket
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[0]


def qemu_argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")[:-1]]


def find_backends(argv: Sequence[str], rams: Sequence[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Region name -> {"arg": index of the -object argument, "id", "size"} for
    each RAM file: the memory backend whose mem-path is that file."""
    out: dict[str, dict[str, Any]] = {}
    for name, path in rams:
        real = os.path.realpath(path)
        for i in range(1, len(argv)):
            if argv[i - 1] != "-object":
                continue
            props = dict(parse_props(argv[i]))
            mp = props.get("mem-path")
            if mp and os.path.realpath(mp) == real:
                out[name] = {"arg": i, "id": props.get("id", ""), "size": props.get("size", "")}
                break
        else:
            raise SnapshotError(f"RAM {path} is not the mem-path of any memory backend on "
                                "QEMU's command line")
    return out


def _check_dir(out: str) -> None:
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out) or os.listdir(out):
            raise SnapshotError(f"{out}: exists and is not an empty directory")
        os.chmod(out, 0o700)
    else:
        os.mkdir(out, 0o700)


async def snapshot(opts: SnapshotOptions, qmp: QMP | None = None) -> SnapshotReport:
    """Save the guest; see the module doc.  ``qmp``: a session already open
    to the QEMU (a QMP socket serves one client at a time)."""
    if qmp is None:
        if not opts.qmp:
            raise SnapshotError("--qmp is needed")
        if not os.path.exists(opts.qmp):
            raise SnapshotError(f"no QMP socket at {opts.qmp}")
        try:
            async with QMP.connect(opts.qmp, timeout=10) as q:
                return await snapshot(opts, q)
        except ConnectionRefusedError:
            raise SnapshotError(f"QMP socket {opts.qmp}: nobody listens") from None
    out = os.path.abspath(opts.out)
    sizes: dict[str, int] = {}
    for name, path in opts.rams:
        try:
            sizes[name] = os.stat(path).st_size
        except OSError as e:
            raise SnapshotError(f"cannot stat RAM {path}: {e.strerror}") from None
    argv = qemu_argv(qemu_pid(qmp))
    backends = find_backends(argv, opts.rams)
    roots = {control.mount_root(p) for _, p in opts.rams}
    if len(roots) > 1:
        raise SnapshotError("the RAM files are in different places")
    mount = roots.pop()
    status = (await qmp.execute("query-status"))["status"]
    if status not in ("running", "paused"):
        raise SnapshotError(f"the guest is {status!r}: it must be running or paused")
    await check_new_volume(opts.volume, volumes.identity_offset(list(sizes.values())))
    _check_dir(out)
    rep = SnapshotReport(source="mount" if mount else "read")
    t0 = time.monotonic()

    def mark(step: str) -> None:
        rep.steps_ms[step] = round((time.monotonic() - t0) * 1000, 1)

    pm_path = os.path.join(out, PAGEMAP)
    dev_path = os.path.join(out, DEVICES)
    was_paused_sync = False
    passes: MountPasses | ReadPasses
    with tempfile.TemporaryDirectory(prefix="memfs-snapshot-") as tmp:
        if mount:
            st = await trio.to_thread.run_sync(control.read_stats, mount)
            if not st.get("sync_volume"):
                raise SnapshotError(f"{mount} copies no pages to a volume: mount it with "
                                    "--volume (or send it 'volume URI')")
            mvol = str(st["sync_volume"])
            if os.path.abspath(mvol) == os.path.abspath(opts.volume) or mvol == opts.volume:
                raise SnapshotError(f"{opts.volume} is the mount's own volume, which changes "
                                    "as the guest runs: give the snapshot a volume of its own")
            was_paused_sync = bool(st.get("sync_paused"))
            passes = MountPasses(mount, None)
            await _passes(passes.prepare)
        else:
            passes = ReadPasses(opts.rams, opts.volume, tmp, None)
        await set_capabilities(qmp, x_ignore_shared=True)
        stopped = resumed = False
        try:
            if status == "running":
                res = await _passes(passes.run, 0, None)    # pass 1, the guest runs
                rep.volume_bytes += int(res.get("bytes_written", 0))
                mark("pass1")
            if mount:
                await _send(mount, "sync-pause")   # the volume holds still from here
            if status == "running":
                await qmp.execute("stop")
                stopped = True
            t_stop = time.monotonic()
            mark("stopped")

            async def pages() -> None:
                res = await _passes(passes.run, 1, pm_path)
                rep.volume_bytes += int(res.get("bytes_written", 0))
                mark("final_pass")

            async def devices() -> None:
                watch = MigrationWatch(started=time.monotonic())
                await qmp.execute("migrate", {"uri": "exec:cat > " + shlex.quote(dev_path)})
                await watch.until(qmp, timeout=opts.timeout, interval=0.005)
                mark("devices")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pages)
                nursery.start_soon(devices)
            if opts.resume and stopped:
                await qmp.execute("cont")
                resumed = True
                mark("resumed")
            rep.paused_ms = round((time.monotonic() - t_stop) * 1000, 1)
        except BaseException:
            if stopped and not resumed:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    try:
                        await qmp.execute("cont")
                    except Exception:
                        pass
            if mount and not was_paused_sync:
                with trio.CancelScope(shield=True):
                    await _send_quiet(mount, "sync-resume")
            raise
        try:
            pm = await trio.to_thread.run_sync(PageMap.load, pm_path)
            if mount:
                got = await rebase_volume(pm, mvol, opts.volume)
                rep.volume_bytes = got["bytes"]  # the snapshot's volume, not the mount's
                await trio.to_thread.run_sync(pm.save, pm_path)
                mark("volume_copied")
        finally:
            if mount and not was_paused_sync:
                with trio.CancelScope(shield=True):
                    await _send_quiet(mount, "sync-resume")
    rec = volumes.recorded(pm.meta)
    vol_uri = next(u for u in pm.disks if u in rec) if rec else opts.volume
    if vol_uri not in rec:
        raise SnapshotError(f"the page map records no identity for volume {vol_uri}")
    man = Manifest(regions=sizes, created=time.time(),
                   volume={"uri": vol_uri, "id": rec[vol_uri][0], "at": rec[vol_uri][1]},
                   qemu={"argv": argv, "backends": backends,
                         "vmgenid": any(a.startswith("vmgenid") for a in argv)})
    await trio.to_thread.run_sync(man.add_file, out, DEVICES)
    await trio.to_thread.run_sync(man.add_file, out, PAGEMAP)
    rep.device_bytes = man.files[DEVICES]["size"]
    rep.total_ms = round((time.monotonic() - t0) * 1000, 1)
    man.info = {"paused_ms": rep.paused_ms, "source": rep.source,
                "device_bytes": rep.device_bytes, "steps_ms": rep.steps_ms}
    await trio.to_thread.run_sync(man.save, out)
    return rep


async def _passes(fn: Any, *args: Any) -> Any:
    try:
        return await fn(*args)
    except PassError as e:
        raise SnapshotError(str(e)) from None


async def _send(mount: str, line: str) -> None:
    try:
        await trio.to_thread.run_sync(control.send, mount, line)
    except control.ControlError as e:
        raise SnapshotError(f"{mount}: {line.split()[0]}: {e}") from None


async def _send_quiet(mount: str, line: str) -> None:
    try:
        await trio.to_thread.run_sync(control.send, mount, line)
    except (control.ControlError, OSError):
        pass


# -- command line ------------------------------------------------------------------

def cmd_snapshot(a: argparse.Namespace) -> int:
    opts = SnapshotOptions(qmp=a.qmp, rams=parse_ram_args(a.ram), volume=a.volume,
                           out=a.out, resume=a.resume, timeout=a.timeout)
    try:
        rep = trio.run(snapshot, opts)
    except trio.TooSlowError:
        print("memfs: snapshot failed: timed out (QEMU's QMP socket or the device state; "
              "a QMP socket serves one client at a time)", file=sys.stderr)
        return 1
    except (SnapshotError, QMPError, OSError, RuntimeError) as e:
        print(f"memfs: snapshot failed: {e or type(e).__name__}", file=sys.stderr)
        return 1
    print(json.dumps(rep.__dict__, indent=1))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "snapshot", help="save a running QEMU guest to a snapshot directory",
        description="Copy the guest's RAM to a volume (on a memfs source mount without "
        "reading RAM), pause it for the final pass and its device state (x-ignore-shared), "
        "and write DIR/manifest.json naming every file with its checksum.")
    p.add_argument("--qmp", required=True, metavar="SOCK", help="the QEMU's QMP socket")
    p.add_argument("--ram", action="append", required=True, metavar="[NAME=]PATH",
                   help="the guest's RAM file (a shared memory backend); repeat per region")
    p.add_argument("--volume", required=True, metavar="URI",
                   help="the snapshot's own volume (a new file or an NBD export)")
    p.add_argument("--out", required=True, metavar="DIR", help="snapshot directory (new or empty)")
    p.add_argument("--resume", action="store_true", help="let the guest run on afterwards")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds for the device state (300)")
    p.set_defaults(func=cmd_snapshot)
