"""``memfs snapshot``: save a running QEMU guest into a snapshot directory.

The guest's RAM is a shared file: a file in a memfs source mount (``memfs
mount --new ... --volume``) or a /dev/shm file.  The steps:

1. while the guest runs: one pass that copies what it has written so far —
   on a memfs mount a ``sync`` (no RAM is read), else a full ``capture``
   to the snapshot's volume;
2. ``stop``; at the same time the final pass (a mount's ``flush``, or a
   capture based on pass 1 that rewrites only changed pages) and the device
   state alone, with ``x-ignore-shared``, to ``DIR/devices`` through
   ``fd:`` (QEMU 7.2 has no ``file:`` migration; the file is handed over
   with ``getfd`` before the pause);
3. ``--resume``: ``cont``; the guest was paused only for step 2;
4. a memfs mount rewrites its volume in place as its guest goes on, so its
   pages are copied to the snapshot's own volume (after the resume: the
   mount's background copy is paused meanwhile, the final pass is not);
5. the manifest (memfs.snapshot), naming the files with their checksums,
   the volume with its identity, and the QEMU command line restore needs.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import trio

from .. import control
from .. import volume as volumes
from ..pagemap import PageMap
from ..snapshot import (DEVICES, PAGEMAP, Manifest, SnapshotError, check_new_volume,
                        rebase_volume)
from .passes import MountPasses, PassError, ReadPasses
from .props import join_props, parse_props
from .plain import MigrationWatch, set_capabilities
from .qmp import QMP

__all__ = ["SnapshotOptions", "snapshot", "qemu_pid", "find_backends",
           "parse_props", "join_props"]

#: the name QEMU knows the device state's file by (getfd, migrate fd:)
_DEVICES_OUT = "memfs-devices-out"


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
    snap = _Snap(opts, qmp)
    await snap.check()
    return await snap.run()


class _Snap:
    """One snapshot, a method per step (each names what it checks or does)."""

    def __init__(self, opts: SnapshotOptions, qmp: QMP) -> None:
        self.opts, self.qmp = opts, qmp
        self.out = os.path.abspath(opts.out)
        self.pm_path = os.path.join(self.out, PAGEMAP)
        self.dev_path = os.path.join(self.out, DEVICES)
        self.sizes: dict[str, int] = {}
        self.argv: list[str] = []
        self.backends: dict[str, dict[str, Any]] = {}
        self.mount: str | None = None
        self.status = ""
        self.mount_volume = ""
        self.was_paused_sync = False
        self.rep = SnapshotReport()
        self.t0 = 0.0

    def mark(self, step: str) -> None:
        self.rep.steps_ms[step] = round((time.monotonic() - self.t0) * 1000, 1)

    async def check(self) -> None:
        """Everything that can be refused before the guest is touched."""
        opts = self.opts
        for name, path in opts.rams:
            try:
                self.sizes[name] = os.stat(path).st_size
            except OSError as e:
                raise SnapshotError(f"cannot stat RAM {path}: {e.strerror}") from None
        self.argv = qemu_argv(qemu_pid(self.qmp))
        self.backends = find_backends(self.argv, opts.rams)
        roots = {control.mount_root(p) for _, p in opts.rams}
        if len(roots) > 1:
            raise SnapshotError("the RAM files are in different places")
        self.mount = roots.pop()
        self.status = (await self.qmp.execute("query-status"))["status"]
        if self.status not in ("running", "paused"):
            raise SnapshotError(f"the guest is {self.status!r}: it must be running or paused")
        await check_new_volume(opts.volume, volumes.identity_offset(list(self.sizes.values())))
        _check_dir(self.out)

    async def run(self) -> SnapshotReport:
        self.rep = SnapshotReport(source="mount" if self.mount else "read")
        self.t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="memfs-snapshot-") as tmp:
            passes = await self._open_passes(tmp)
            await set_capabilities(self.qmp, x_ignore_shared=True)
            try:
                await self._save(passes)
                pm = await trio.to_thread.run_sync(PageMap.load, self.pm_path)
                if self.mount:
                    got = await rebase_volume(pm, self.mount_volume, self.opts.volume)
                    self.rep.volume_bytes = got["bytes"]  # the snapshot's volume, not the mount's
                    await trio.to_thread.run_sync(pm.save, self.pm_path)
                    self.mark("volume_copied")
            finally:
                if self.mount and not self.was_paused_sync:
                    with trio.CancelScope(shield=True):
                        await _send_quiet(self.mount, "sync-resume")
        await self._manifest(pm)
        return self.rep

    async def _open_passes(self, tmp: str) -> MountPasses | ReadPasses:
        """A memfs source mount copies its own dirty pages; any other RAM is read."""
        if not self.mount:
            return ReadPasses(self.opts.rams, self.opts.volume, tmp, None)
        st = await trio.to_thread.run_sync(control.read_stats, self.mount)
        if not st.get("sync_volume"):
            raise SnapshotError(f"{self.mount} copies no pages to a volume: mount it with "
                                "--volume (or send it 'volume URI')")
        self.mount_volume = mvol = str(st["sync_volume"])
        if os.path.abspath(mvol) == os.path.abspath(self.opts.volume) or mvol == self.opts.volume:
            raise SnapshotError(f"{self.opts.volume} is the mount's own volume, which changes "
                                "as the guest runs: give the snapshot a volume of its own")
        self.was_paused_sync = bool(st.get("sync_paused"))
        passes = MountPasses(self.mount, None)
        await _passes(passes.prepare)
        return passes

    async def _save(self, passes: MountPasses | ReadPasses) -> None:
        """A pass while the guest runs, then the guest paused for the final
        pass and its device state side by side; it runs on if it ran before
        and something failed, or with --resume."""
        qmp, running = self.qmp, self.status == "running"
        stopped = resumed = False
        try:
            if running:
                res = await _passes(passes.run, 0, None)    # pass 1, the guest runs
                self.rep.volume_bytes += int(res.get("bytes_written", 0))
                self.mark("pass1")
            if self.mount:
                await _send(self.mount, "sync-pause")   # the volume holds still from here
            # QEMU writes the device state itself (migrate fd:), the file
            # handed over before the pause: exec:cat would spawn a shell and
            # cat while the guest is stopped, and cat could still be writing
            # when QEMU reports the migration completed
            await qmp.send_file(_DEVICES_OUT, self.dev_path,
                                os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            if running:
                await qmp.execute("stop")
                stopped = True
            t_stop = time.monotonic()
            self.mark("stopped")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._final_pass, passes)
                nursery.start_soon(self._devices)
            if self.opts.resume and stopped:
                await qmp.execute("cont")
                resumed = True
                self.mark("resumed")
            self.rep.paused_ms = round((time.monotonic() - t_stop) * 1000, 1)
        except BaseException:
            if stopped and not resumed:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    try:
                        await qmp.execute("cont")
                    except Exception:
                        pass
            raise

    async def _final_pass(self, passes: MountPasses | ReadPasses) -> None:
        res = await _passes(passes.run, 1, self.pm_path)
        self.rep.volume_bytes += int(res.get("bytes_written", 0))
        self.mark("final_pass")

    async def _devices(self) -> None:
        watch = MigrationWatch(started=time.monotonic())
        await self.qmp.execute("migrate", {"uri": "fd:" + _DEVICES_OUT})
        await watch.until(self.qmp, timeout=self.opts.timeout, interval=0.005)
        self.mark("devices")

    async def _manifest(self, pm: PageMap) -> None:
        """DIR/manifest.json: every file with its checksum, the volume's identity."""
        rep, out = self.rep, self.out
        rec = volumes.recorded(pm.meta)
        vol_uri = next(u for u in pm.disks if u in rec) if rec else self.opts.volume
        if vol_uri not in rec:
            raise SnapshotError(f"the page map records no identity for volume {vol_uri}")
        man = Manifest(regions=self.sizes, created=time.time(),
                       volume={"uri": vol_uri, "id": rec[vol_uri][0], "at": rec[vol_uri][1]},
                       qemu={"argv": self.argv, "backends": self.backends,
                             "vmgenid": any(a.startswith("vmgenid") for a in self.argv)})
        await trio.to_thread.run_sync(man.add_file, out, DEVICES)
        await trio.to_thread.run_sync(man.add_file, out, PAGEMAP)
        rep.device_bytes = man.files[DEVICES]["size"]
        rep.total_ms = round((time.monotonic() - self.t0) * 1000, 1)
        man.info = {"paused_ms": rep.paused_ms, "source": rep.source,
                    "device_bytes": rep.device_bytes, "steps_ms": rep.steps_ms}
        await trio.to_thread.run_sync(man.save, out)


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
