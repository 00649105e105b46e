"""``memfs snapshot`` and ``memfs restore`` with the real guest.

One guest boots on a memfs source mount, is saved while it runs (paused
only for the final pass) and goes on; the snapshot is then restored once
and as four clones at the same time from one mount (``share=off``): each
has the snapshot's checksums and its mark, writes of its own that no
sibling sees, and a vmgenid of its own; the snapshot survives a drop of
the host's caches and a remount; a corrupted file is refused in one line.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs import control
from memfs.qemu import VM, file_backend
from memfs.qemu.guest import GuestImage, GuestSum, guest_config, read_sum
from memfs.qemu.nic import replace_nics
from memfs.qemu.restore import ensure_mount, open_snapshot, restore_clones
from memfs.qemu.snapshot import SnapshotOptions, join_props, parse_props, snapshot
from memfs.snapshot import DEVICES, MANIFEST, PAGEMAP, Manifest, SnapshotError
from ramimage import PS, memfs, mounted
from test_migrate import FILL, RAM, check_sum, drop_caches

#: the tests that boot the guest (the manifest and argument parsers at the end do not)
guest_test = pytest.mark.usefixtures("needs_fuse")
GUEST = [pytest.mark.qemu, pytest.mark.mount, pytest.mark.slow, guest_test]


def on_guest(f):  # type: ignore[no-untyped-def]
    for m in GUEST:
        f = m(f)
    return f


class Saved:
    """The module's snapshot: its directory and the guest's sums before it."""

    def __init__(self, dir: Path, volume: Path, before: GuestSum, guid: str) -> None:
        self.dir, self.volume, self.before, self.guid = dir, volume, before, guid


async def _make_snapshot(image: GuestImage, where: Path) -> Saved:
    mnt, mvol = where / "src", where / "src.vol"
    snap, svol = where / "snap", where / "snap.vol"
    with mounted(None, str(mnt), "--new", f"ram0:{RAM}", "--volume", str(mvol)), \
            trio.fail_after(150):
        cfg = guest_config(image, file_backend(mnt / "ram0", RAM), "src", fill_mib=FILL)
        cfg.extra_args += ["-device", "vmgenid,guid=auto"]
        async with VM.start(cfg, where) as vm:
            await vm.console.expect(r"^READY", 30)
            await trio.sleep(1.0)
            await vm.console.command("mark m-snap", r"^MARK m-snap", 10)
            before = await read_sum(vm.console, "before")
            guid = (await vm.qmp.execute("query-vm-generation-id"))["guid"]
            opts = SnapshotOptions(qmp=None, rams=[("ram0", str(mnt / "ram0"))],
                                   volume=str(svol), out=str(snap), resume=True)
            rep = await snapshot(opts, vm.qmp)
            print("snapshot", rep)
            assert rep.source == "mount" and rep.paused_ms > 0
            assert (await vm.qmp.execute("query-status"))["status"] == "running"
            # the guest goes on: its writes reach the mount's volume, not the snapshot
            await vm.console.command("mark m-later", r"^MARK m-later", 10)
            await vm.console.command("sum later", r"^SUM later", 30)
            await trio.sleep(2.5)          # the mount's background copy runs meanwhile
            st = control.read_stats(mnt)
            assert not st["sync_paused"], st
    return Saved(snap, svol, before, guid)


@pytest.fixture(scope="module")
def saved(guest: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return trio.run(_make_snapshot, guest, tmp_path_factory.mktemp("snapshot"))


def umount(mnt: Path) -> None:
    subprocess.run([sys.executable, "-m", "memfs.cli", "umount", str(mnt)],
                   capture_output=True, timeout=60)


async def check_clone(image: GuestImage, vm: VM, saved: Saved, tag: str) -> None:
    await vm.console.send("readmark")
    m = await vm.console.expect(r"^MARKED (\S*)", 60)
    assert m.group(1) == "m-snap"
    check_sum(image, await read_sum(vm.console, tag, 60), saved.before)


@on_guest
async def test_restore_once_and_four_clones(guest: GuestImage, saved: Saved,
                                            tmp_path: Path) -> None:
    snap = open_snapshot(str(saved.dir))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with trio.fail_after(240):
            assert ensure_mount(snap, str(mnt))
            async with restore_clones(snap, str(mnt), 1, str(tmp_path), "one") as (vm,):
                await check_clone(guest, vm, saved, "one")
                await vm.qmp.execute("quit")
            async with restore_clones(snap, str(mnt), 4, str(tmp_path)) as vms:
                async with trio.open_nursery() as nursery:
                    for i, vm in enumerate(vms):
                        nursery.start_soon(check_clone, guest, vm, saved, f"c{i}")
                # each clone writes its own mark; none sees another's
                for i, vm in enumerate(vms):
                    await vm.console.command(f"mark clone-{i}", rf"^MARK clone-{i}", 30)
                for i, vm in enumerate(vms):
                    await vm.console.send("readmark")
                    m = await vm.console.expect(r"^MARKED (\S*)", 30)
                    assert m.group(1) == f"clone-{i}"
                guids = [(await vm.qmp.execute("query-vm-generation-id"))["guid"]
                         for vm in vms]
                assert len(set(guids) | {saved.guid}) == 5, (guids, saved.guid)
                # the host drops its caches: the clones' own pages stay theirs,
                # the shared ones come back from the volume
                await trio.to_thread.run_sync(drop_caches)
                for i, vm in enumerate(vms):
                    await vm.console.send("readmark")
                    m = await vm.console.expect(r"^MARKED (\S*)", 60)
                    assert m.group(1) == f"clone-{i}"
                    check_sum(guest, await read_sum(vm.console, f"d{i}", 60), saved.before)
                st = control.read_stats(mnt)
                assert st["checksum_failures"] == 0, st
                # the clones map the region privately: the mount saw no write
                assert st["writes"] == 0, st
        # a remount serves the same snapshot, its first working-set trace first
        umount(mnt)
        assert (saved.dir / (PAGEMAP + ".trace")).exists()
        with trio.fail_after(120):
            assert ensure_mount(snap, str(mnt))
            pid = int((mnt / ".memfs" / "pid").read_text())
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            i = args.index(b"--prefetch-trace")   # the first mount's trace goes first
            assert args[i + 1] == str(saved.dir / (PAGEMAP + ".trace")).encode(), args
            async with restore_clones(snap, str(mnt), 1, str(tmp_path), "again") as (vm,):
                await check_clone(guest, vm, saved, "again")
    finally:
        umount(mnt)


#: a NIC the clones must replace: on q35 it needs a hotpluggable slot
NIC_MAC = "52:54:00:12:34:56"
NIC_ON_PORT = ["-device", "pcie-root-port,id=rp0,chassis=1", "-netdev", "user,id=n0",
               "-device", f"virtio-net-pci,netdev=n0,bus=rp0,id=net0,mac={NIC_MAC}"]
NIC_ON_ROOT = ["-netdev", "user,id=n0", "-device", f"virtio-net-pci,netdev=n0,mac={NIC_MAC}"]


async def guest_macs(vm: VM) -> list[str]:
    """The addresses in the guest's /sys/class/net/*/address (but lo)."""
    m = await vm.console.command("macs", r"^MACS(.*)", 30)
    return [w.split("=", 1)[1] for w in m.group(1).split()]


async def _snapshot_with_nic(image: GuestImage, where: Path, nic: list[str]) -> Path:
    """A guest with a NIC whose driver is bound (the guest saw NIC_MAC), saved."""
    ram, snap = where / "ram0", where / "snap"
    with trio.fail_after(150):
        cfg = guest_config(image, file_backend(ram, RAM), "nicsrc", fill_mib=8)
        cfg.extra_args += nic + ["-device", "vmgenid,guid=auto"]
        async with VM.start(cfg, where) as vm:
            await vm.console.expect(r"^READY", 60)
            assert await guest_macs(vm) == [NIC_MAC]
            await snapshot(SnapshotOptions(qmp=None, rams=[("ram0", str(ram))],
                                           volume=str(where / "snap.vol"), out=str(snap)),
                           vm.qmp)
    return snap


@on_guest
async def test_clones_see_new_macs(guest: GuestImage, shm: Path, tmp_path: Path) -> None:
    """Four clones of a guest with a virtio NIC: each guest's own
    /sys/class/net/eth0/address is the new MAC restore gave it (the NIC is
    replugged after the resume), all differ from each other and from the
    snapshot's; QEMU's rx filter agrees.  With --keep-mac the guest keeps the
    saved MAC, which is what the device state alone gives it."""
    snap = open_snapshot(str(await _snapshot_with_nic(guest, shm, NIC_ON_PORT)))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with trio.fail_after(300):
            assert ensure_mount(snap, str(mnt))
            async with restore_clones(snap, str(mnt), 4, str(tmp_path), "nic") as vms:
                seen = []
                for vm in vms:
                    ident = vm.config.ident
                    print(f"{vm.config.name}: load {vm.config.load_s * 1000:.0f} ms, NIC "
                          f"replaced in {vm.config.mac_s * 1000:.0f} ms: {ident.macs}")
                    assert len(ident.macs) == 1
                    with trio.fail_after(30):   # the guest probes the new NIC
                        while (got := await guest_macs(vm)) != ident.macs:
                            await trio.sleep(0.1)
                    seen += got
                    (f,) = await vm.qmp.execute("query-rx-filter")
                    assert f["main-mac"] == ident.macs[0], f
                assert len(set(seen)) == 4 and NIC_MAC not in seen, seen
                await check_clone_mark(vms[0])
                # a guest that does not release its NIC (here: stopped) fails
                # the replacement in one line, after the timeout
                vm = vms[1]
                await vm.qmp.execute("stop")
                t = time.monotonic()
                with pytest.raises(SnapshotError) as e:
                    await replace_nics(vm.qmp, vm.config.ident.nics, timeout=2)
                print(f"not released: {(time.monotonic() - t) * 1000:.0f} ms: {e.value}")
                assert str(e.value) == (
                    f"QEMU {vm.qmp_path}: the guest did not release NIC net0 within 2 s (it "
                    "needs PCI hotplug and the NIC's driver; or restore with --keep-mac)")
            async with restore_clones(snap, str(mnt), 1, str(tmp_path), "keep",
                                      keep_mac=True) as (vm,):
                assert vm.config.ident.macs == []
                assert await guest_macs(vm) == [NIC_MAC]
    finally:
        umount(mnt)


async def check_clone_mark(vm: VM) -> None:
    """The guest still answers after its NIC was swapped under it."""
    await vm.console.command("mark after-nic", r"^MARK after-nic", 30)


@on_guest
async def test_nic_without_hotplug_is_refused(guest: GuestImage, shm: Path,
                                              tmp_path: Path) -> None:
    """A NIC on q35's root bus cannot be unplugged: refused in one line before
    the device state is loaded; the mount the command made is unmounted."""
    d = await _snapshot_with_nic(guest, shm, NIC_ON_ROOT)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    t = time.monotonic()
    res = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "memfs.cli", "restore", str(d), "--mount", str(mnt),
         "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120))
    print(f"no hotplug: {(time.monotonic() - t) * 1000:.0f} ms: {res.stderr}")
    assert res.returncode == 1 and res.stderr.splitlines() == [
        "memfs: restore failed: NIC memfs-nic0 is on a bus without hotplug, so the guest "
        "cannot be given its new MAC (put it on a pcie-root-port on q35, or restore with "
        "--keep-mac)"], res.stderr
    assert not os.path.ismount(mnt)
    pid = int((tmp_path / "run" / "clone0.pid").read_text())
    for _ in range(50):   # the QEMU it started was killed (gone, or a zombie)
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        await trio.sleep(0.1)
    else:
        raise AssertionError(f"QEMU {pid} still runs")


def _copy(saved: Saved, to: Path) -> Path:
    shutil.copytree(saved.dir, to, ignore=shutil.ignore_patterns("run", "*.trace*"))
    return to


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


def _restore_cli(d: Path, mnt: Path) -> tuple[int, str, float]:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "memfs.cli", "restore", str(d), "--mount",
                          str(mnt)], capture_output=True, text=True, timeout=60)
    return res.returncode, res.stderr, time.monotonic() - t0


@on_guest
@pytest.mark.parametrize("what", ["manifest", "devices", "pagemap", "truncated"])
def test_corrupt_snapshot_is_refused(saved: Saved, tmp_path: Path, what: str) -> None:
    d = _copy(saved, tmp_path / "snap")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if what == "manifest":
        text = (d / MANIFEST).read_text()
        at = text.index('"paused_ms": ') + len('"paused_ms": ')
        while text[at + 1] in "0123456789.":
            at += 1
        if text[at] == ".":
            at -= 1
        # the number's last digit: still a number (the first could become a
        # leading zero, which is not JSON), so the checksum must catch it
        _flip(d / MANIFEST, at)
        want = f"memfs: restore failed: {d}/{MANIFEST}: corrupt: checksum mismatch"
    elif what == "devices":
        _flip(d / DEVICES, os.path.getsize(d / DEVICES) // 2)
        want = f"memfs: restore failed: {d}/{DEVICES}: corrupt: checksum mismatch"
    elif what == "pagemap":
        _flip(d / PAGEMAP, os.path.getsize(d / PAGEMAP) - 100)
        want = f"memfs: restore failed: {d}/{PAGEMAP}: corrupt: checksum mismatch"
    else:
        size = os.path.getsize(d / DEVICES)
        os.truncate(d / DEVICES, size - 1)
        want = (f"memfs: restore failed: {d}/{DEVICES}: corrupt: {size - 1} bytes, the "
                f"manifest says {size}")
    rc, err, secs = _restore_cli(d, mnt)
    print(f"{what}: {secs * 1000:.0f} ms: {err.strip()}")
    assert rc == 1 and err.splitlines() == [want], err
    assert not os.path.ismount(mnt)  # nothing was mounted, nothing started
    with pytest.raises(SnapshotError):
        open_snapshot(str(d))


@on_guest
def test_replaced_volume_is_refused(saved: Saved, tmp_path: Path) -> None:
    """The volume recreated under the same name: the mount refuses the page
    map before it serves a page, and restore says so in one line."""
    d = _copy(saved, tmp_path / "snap")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    backup = tmp_path / "vol.orig"
    os.rename(saved.volume, backup)
    try:
        shutil.copyfile(backup, saved.volume)
        snap = open_snapshot(str(d))
        at = snap.manifest.volume["at"]
        _flip(saved.volume, at + 20)   # inside the identity's UUID
        rc, err, secs = _restore_cli(d, mnt)
        print(f"volume replaced: {secs * 1000:.0f} ms: {err.strip()}")
        assert rc == 1 and len(err.splitlines()) == 1, err
        assert err.startswith("memfs: restore failed: ") and "volume" in err \
            and str(saved.volume) in err, err
        assert not os.path.ismount(mnt)
    finally:
        os.replace(backup, saved.volume)


async def _kill_and_umount(pids: Iterable[int], mnt: Path) -> None:
    """The clones a test started (daemonized, so killed by pid), then their mount."""
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    await trio.sleep(0.5)
    umount(mnt)


async def _serial_line(path: str, command: str, pattern: str) -> str:
    """Send a console command over a clone's serial socket and return the
    first line starting with ``pattern``."""
    with trio.fail_after(60):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(command.encode() + b"\n")
            buf = b""
            while True:
                buf += await stream.receive_some(4096)
                *done, rest = buf.split(b"\n")   # whole lines only
                for raw in done:
                    line = raw.decode("utf-8", "replace").strip()
                    if line.startswith(pattern):
                        return line
                buf = rest


@on_guest
async def test_restore_command_line(saved: Saved, tmp_path: Path) -> None:
    """The command itself: two daemonized clones (serial and QMP on sockets),
    then --print-args and --qmp for a QEMU started by someone else."""
    from memfs.qemu.qmp import QMP
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = tmp_path / "run"
    memfs_cmd = [sys.executable, "-m", "memfs.cli", "restore", str(saved.dir), "--mount",
                 str(mnt), "--run-dir", str(run)]
    pids: list[int] = []
    try:
        res = await trio.to_thread.run_sync(lambda: subprocess.run(
            memfs_cmd + ["--clones", "2"], capture_output=True, text=True, timeout=120))
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        clones = out["clones"]
        pids = [c["pid"] for c in clones]
        assert len({c["vmgenid"] for c in clones}) == 2
        t = out["t"]   # the command's steps, in order, in the host's monotonic clock
        assert t["start"] <= t["imported"] <= t["checked"] <= t["mounted"] <= t["qemu_started"] \
            <= t["resumed"]
        assert t["resumed"] == max(c["t_cont"] for c in clones)
        for c in clones:   # the console log has what the guest printed since the resume
            with trio.fail_after(30):
                while b"\nT " not in Path(c["console"]).read_bytes():
                    await trio.sleep(0.1)
        for c in clones:
            async with QMP.connect(c["qmp"], timeout=10) as q:
                assert (await q.execute("query-status"))["status"] == "running"
                assert (await q.execute("query-vm-generation-id"))["guid"] == c["vmgenid"]
            assert await _serial_line(c["serial"], "readmark", "MARKED") == "MARKED m-snap"
        # someone else starts QEMU from the printed line; memfs drives it
        res = await trio.to_thread.run_sync(lambda: subprocess.run(
            memfs_cmd + ["--print-args", "--name", "ext"], capture_output=True, text=True,
            timeout=60))
        assert res.returncode == 0, res.stderr
        (line,) = res.stdout.splitlines()
        argv = shlex.split(line)
        assert argv[-2:] == ["-incoming", "defer"]
        assert any(a.startswith("memory-backend-file,") and f"mem-path={mnt}/ram0" in a
                   and "share=off" in a for a in argv), argv
        serial = str(run / "ext0.serial")
        argv[argv.index("stdio")] = f"unix:{serial},server=on,wait=off"
        argv += ["-daemonize", "-pidfile", str(run / "ext0.pid")]
        subprocess.run(argv, check=True, timeout=60)
        pids.append(int((run / "ext0.pid").read_text()))
        res = await trio.to_thread.run_sync(lambda: subprocess.run(
            memfs_cmd + ["--qmp", str(run / "ext0.qmp")], capture_output=True, text=True,
            timeout=60))
        assert res.returncode == 0, res.stderr
        assert await _serial_line(serial, "readmark", "MARKED") == "MARKED m-snap"
        # a QEMU that is not waiting for a migration is refused in one line
        t = time.monotonic()
        res = await trio.to_thread.run_sync(lambda: subprocess.run(
            memfs_cmd + ["--qmp", str(run / "ext0.qmp")], capture_output=True, text=True,
            timeout=60))
        print(f"not incoming: {(time.monotonic() - t) * 1000:.0f} ms: {res.stderr}")
        assert res.returncode == 1 and res.stderr.splitlines() == [
            f"memfs: restore failed: QEMU {run}/ext0.qmp is 'running', not waiting for a "
            "migration (start it with -incoming defer)"], res.stderr
    finally:
        await _kill_and_umount(pids, mnt)


@on_guest
async def test_snapshot_command_from_shm(guest: GuestImage, shm: Path, tmp_path: Path) -> None:
    """``memfs snapshot`` on a guest whose RAM is a /dev/shm file (RAM is read:
    a capture pass while it runs, one based on it while it is stopped),
    without --resume: the guest stays stopped; a clone has its sums."""
    snap, vol = tmp_path / "snap", tmp_path / "snap.vol"
    ram = shm / "ram0"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    extra_qmp = tmp_path / "extra.qmp"   # the test holds the VM's own QMP socket
    try:
        with trio.fail_after(240):
            cfg = guest_config(guest, file_backend(ram, RAM), "shm", fill_mib=FILL)
            cfg.extra_args += ["-qmp", f"unix:{extra_qmp},server=on,wait=off"]
            async with VM.start(cfg, tmp_path) as vm:
                await vm.console.expect(r"^READY", 30)
                await trio.sleep(1.0)
                await vm.console.command("mark m-shm", r"^MARK m-shm", 10)
                before = await read_sum(vm.console, "before")
                # pages are never written over an existing volume (another
                # snapshot's): refused before the guest is touched
                old = tmp_path / "old.vol"
                old.write_bytes(b"x")
                t = time.monotonic()
                res = await trio.to_thread.run_sync(lambda: subprocess.run(
                    [sys.executable, "-m", "memfs.cli", "snapshot", "--qmp", str(extra_qmp),
                     "--ram", f"ram0={ram}", "--volume", str(old), "--out", str(snap)],
                    capture_output=True, text=True, timeout=120))
                assert res.returncode == 1 and res.stderr.splitlines() == [
                    f"memfs: snapshot failed: volume {old} exists: a snapshot needs a new "
                    "volume"], res.stderr
                print(f"volume exists: {(time.monotonic() - t) * 1000:.0f} ms: {res.stderr}")
                assert not snap.exists()
                assert (await vm.qmp.execute("query-status"))["status"] == "running"
                res = await trio.to_thread.run_sync(lambda: subprocess.run(
                    [sys.executable, "-m", "memfs.cli", "snapshot", "--qmp", str(extra_qmp),
                     "--ram", f"ram0={ram}", "--volume", str(vol), "--out", str(snap)],
                    capture_output=True, text=True, timeout=120))
                assert res.returncode == 0, res.stderr
                rep = json.loads(res.stdout)
                print("snapshot", rep)
                assert rep["source"] == "read" and rep["volume_bytes"] >= FILL // 2 << 20
                assert (await vm.qmp.execute("query-status"))["status"] == "postmigrate"
                # a guest saved and left stopped cannot be saved again (QEMU would
                # refuse the second migration): said before anything is written
                t = time.monotonic()
                res = await trio.to_thread.run_sync(lambda: subprocess.run(
                    [sys.executable, "-m", "memfs.cli", "snapshot", "--qmp", str(extra_qmp),
                     "--ram", f"ram0={ram}", "--volume", str(vol), "--out", str(snap)],
                    capture_output=True, text=True, timeout=120))
                assert res.returncode == 1 and res.stderr.splitlines() == [
                    "memfs: snapshot failed: the guest is 'postmigrate': it must be "
                    "running or paused"]
                print(f"postmigrate: {(time.monotonic() - t) * 1000:.0f} ms: {res.stderr}")
            s = open_snapshot(str(snap))
            assert ensure_mount(s, str(mnt))
            async with restore_clones(s, str(mnt), 1, str(tmp_path), "shmclone") as (c,):
                await c.console.send("readmark")
                m = await c.console.expect(r"^MARKED (\S*)", 60)
                assert m.group(1) == "m-shm"
                check_sum(guest, await read_sum(c.console, "c", 60), before)
    finally:
        umount(mnt)


def _read_in_child(path: str, offset: int, length: int) -> bytes:
    """Bytes of the region file, read by another process (FUSE-backed)."""
    code = ("import sys; f = open(sys.argv[1], 'rb'); f.seek(int(sys.argv[2])); "
            "sys.stdout.buffer.write(f.read(int(sys.argv[3])))")
    return subprocess.run([sys.executable, "-c", code, path, str(offset), str(length)],
                          capture_output=True, check=True, timeout=60).stdout


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_prefetch_delay_lets_the_first_reads_go_first(tmp_path: Path,
                                                      ram: tuple[str, bytes]) -> None:
    """``--prefetch-delay`` (restore's mount uses it): no page is prefetched
    while nothing reads the region; after the first READ and a pause in the
    READs the background completion fetches every page, with real bytes."""
    path, data = ram
    pm, log = str(tmp_path / "pm"), str(tmp_path / "mnt.log")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt, "--prefetch-delay", "0.3", log=log):
        time.sleep(1.5)   # nobody reads: the completion waits
        st = control.read_stats(mnt)
        assert st["pages_prefetched"] == 0 and st["prefetch_done"] == 0, st
        remote = st["pages_remote"]
        assert remote > 0, st
        region = os.path.join(mnt, "ram0")
        assert _read_in_child(region, 7 * PS, PS) == data[7 * PS:8 * PS]
        deadline = time.monotonic() + 60
        while not (st := control.read_stats(mnt))["prefetch_done"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        assert st["pages_remote"] == 0 and st["pages_prefetched"] > 0, st
        assert _read_in_child(region, 0, len(data)) == data
    with open(log) as f:
        started = [ln for ln in f if "prefetch: starting" in ln]
    assert len(started) == 1 and "after the first READ" in started[0], started


# -- parsers (no guest) ------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def _signed(doc: dict) -> bytes:
    from memfs.snapshot import _canonical
    import xxhash
    doc = dict(doc)
    doc.pop("checksum", None)
    doc["checksum"] = xxhash.xxh3_128_hexdigest(_canonical(doc))
    return json.dumps(doc).encode()


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_manifest_bytes_fuzz(raw: bytes) -> None:
    """Any bytes: a Manifest or one SnapshotError, never another exception."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, MANIFEST).write_bytes(raw)
        with pytest.raises(SnapshotError):
            Manifest.load(d)


@settings(max_examples=300, deadline=None)
@given(files=_json, regions=_json, volume=_json, qemu=_json, created=_json,
       extra=st.dictionaries(st.sampled_from(["info", "version", "format"]), _json))
def test_manifest_fields_fuzz(files: object, regions: object, volume: object, qemu: object,
                              created: object, extra: dict) -> None:
    """A manifest whose own checksum is right but whose fields are anything:
    loaded (and then well-formed) or refused with one SnapshotError."""
    doc = {"format": "memfs-snapshot", "version": 1, "files": files, "regions": regions,
           "volume": volume, "qemu": qemu, "created": created, **extra}
    with tempfile.TemporaryDirectory() as d:
        Path(d, MANIFEST).write_bytes(_signed(doc))
        try:
            m = Manifest.load(d)
        except SnapshotError as e:
            assert str(e).startswith(f"{d}/{MANIFEST}: ") and "\n" not in str(e)
            return
        assert {DEVICES, PAGEMAP} <= set(m.files)
        assert all(os.path.basename(n) == n for n in m.files)


@given(props=st.lists(st.tuples(st.text("abcz-_.", min_size=1, max_size=6),
                                 st.text(max_size=10).filter(lambda v: "\0" not in v)),
                      max_size=5),
       head=st.text(min_size=1, max_size=10).filter(lambda v: "=" not in v))
def test_props_round_trip(props: list, head: str) -> None:
    """QEMU's key=value lists (with ,, for a comma) survive parse and join,
    so a clone's command line keeps every property it does not change."""
    pairs = [("", head)] + props
    assert parse_props(join_props(pairs)) == pairs


def _snap_with_argv(argv: list[str]) -> "Snapshot":
    from memfs.qemu.restore import Snapshot
    man = Manifest(qemu={"argv": argv, "backends": {"ram0": {"arg": 2}}})
    return Snapshot("/snap", man, None)  # type: ignore[arg-type]


def test_clone_argv_nics() -> None:
    """A NIC's -device gets a new MAC and an id (memfs-nicN when it had none,
    its own kept), every other property kept; --keep-mac leaves it; a -nic
    cannot be replaced and is refused in one line; the clone starts with
    -S -incoming defer."""
    from memfs.qemu.restore import Identity, clone_argv
    argv = ["qemu", "-object", "memory-backend-file,id=ram0,size=1G,mem-path=/x,share=on",
            "-device", "virtio-net-pci,netdev=n0,bus=rp0,mac=52:54:00:12:34:56,romfile=",
            "-device", "e1000,netdev=n1,id=mine,addr=0x5", "-S"]
    ident = Identity()
    out = clone_argv(_snap_with_argv(argv), "/mnt", "c0", "/q", ident)
    assert [n.id for n in ident.nics] == ["memfs-nic0", "mine"]
    assert len(set(ident.macs) | {"52:54:00:12:34:56"}) == 3
    assert all(int(m[:2], 16) & 3 == 2 for m in ident.macs)   # local, unicast
    assert out[4] == ("virtio-net-pci,netdev=n0,bus=rp0,romfile=,id=memfs-nic0,"
                      f"mac={ident.macs[0]}")
    assert out[6] == f"e1000,netdev=n1,id=mine,addr=0x5,mac={ident.macs[1]}"
    assert out[2] == "memory-backend-file,id=ram0,size=1G,mem-path=/mnt/ram0,share=off"
    assert out[-3:] == ["-S", "-incoming", "defer"] and out.count("-S") == 1
    kept = Identity(keep_mac=True)
    assert clone_argv(_snap_with_argv(argv), "/mnt", "c0", "/q", kept)[4:7] == argv[4:7]
    assert kept.nics == []
    nic = argv[:3] + ["-nic", "user,model=virtio-net-pci"]
    with pytest.raises(SnapshotError) as e:
        clone_argv(_snap_with_argv(nic), "/mnt", "c0", "/q", Identity())
    assert str(e.value) == (
        "the saved guest's NIC -nic user,model=virtio-net-pci has no id to replace it by, so "
        "a clone cannot get a new MAC: start the source with -netdev ...,id=N -device "
        "...,netdev=N,id=ID (or restore with --keep-mac)")
    assert clone_argv(_snap_with_argv(nic), "/mnt", "c0", "/q", Identity(keep_mac=True))



def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _pool_restore(snap: Path, sock: Path, n: int) -> dict:
    res = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "memfs.cli", "restore", str(snap), "--pool", str(sock),
         "--clones", str(n)], capture_output=True, text=True, timeout=120))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@on_guest
async def test_restore_pool(saved: Saved, guest: GuestImage, tmp_path: Path) -> None:
    """``memfs restore --serve`` keeps clones started and waiting;
    ``--pool`` resumes them: each has the snapshot's mark and checksums and
    a vmgenid of its own, the pool refills, and more clones than wait are
    started on demand; a request for another snapshot and a pool that is not
    there are refused in one line; a waiting clone that dies is replaced;
    stopping the pool kills only the clones that still wait."""
    from memfs.qemu.guest import GuestSum
    from memfs.qemu.qmp import QMP
    mnt, run, sock = tmp_path / "mnt", tmp_path / "run", tmp_path / "pool.sock"
    mnt.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "memfs.cli", "restore", str(saved.dir), "--mount", str(mnt),
         "--run-dir", str(run), "--clones", "2", "--serve", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    resumed: list[dict] = []
    dead = ""
    try:
        assert server.stdout is not None
        ready = json.loads(await trio.to_thread.run_sync(server.stdout.readline))
        assert ready["waiting"] == 2 and ready["mount"] == str(mnt), ready
        one = await _pool_restore(saved.dir, sock, 1)
        assert one["t"]["start"] <= one["t"]["request"] <= one["t"]["resumed"]
        resumed += one["clones"]
        three = await _pool_restore(saved.dir, sock, 3)   # 1 or 2 wait: the rest start now
        resumed += three["clones"]
        assert len({c["name"] for c in resumed}) == 4
        assert len({c["vmgenid"] for c in resumed} | {saved.guid}) == 5
        for c in resumed:
            assert await _serial_line(c["serial"], "readmark", "MARKED") == "MARKED m-snap"
            line = await _serial_line(c["serial"], f"sum {c['name']}", f"SUM {c['name']} ")
            f = dict(kv.split("=") for kv in line.split()[2:])
            check_sum(guest, GuestSum(c["name"], f["fill"], f["work"], int(f["gen"]),
                                      int(f["maxgap"])), saved.before)
            async with QMP.connect(c["qmp"], timeout=30) as q:   # once the pool let go
                assert (await q.execute("query-status"))["status"] == "running"
                assert (await q.execute("query-vm-generation-id"))["guid"] == c["vmgenid"]
        # refused in one line: another snapshot, no pool
        res = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "memfs.cli", "restore", str(tmp_path), "--pool", str(sock)],
            capture_output=True, text=True, timeout=60))
        assert res.returncode == 1 and res.stderr.splitlines() == [
            f"memfs: restore failed: this pool serves {saved.dir}, not {tmp_path}"]
        res = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "memfs.cli", "restore", str(saved.dir), "--pool",
             str(tmp_path / "nopool")], capture_output=True, text=True, timeout=60))
        assert res.returncode == 1 and res.stderr.splitlines() == [
            f"memfs: restore failed: no restore pool listens at {tmp_path}/nopool (start one "
            "with memfs restore DIR --mount MNT --serve SOCK)"]
        with trio.fail_after(60):   # the pool fills up again
            while len(list(run.glob("*.pid"))) < 6:
                await trio.sleep(0.1)
        res = await trio.to_thread.run_sync(lambda: subprocess.run(   # one pool per socket
            [sys.executable, "-m", "memfs.cli", "restore", str(saved.dir), "--mount",
             str(tmp_path / "mnt2"), "--serve", str(sock)], capture_output=True, text=True,
            timeout=60))
        assert res.returncode == 1 and res.stderr.splitlines() == [
            f"memfs: restore failed: {sock}: a restore pool already listens there"]
        # a waiting clone that dies is replaced before anyone asks for it
        dead = next(p.stem for p in run.glob("*.pid")
                    if p.stem not in {c["name"] for c in resumed})
        os.kill(int((run / f"{dead}.pid").read_text()), 9)
        with trio.fail_after(60):
            while len(list(run.glob("*.pid"))) < 7:
                await trio.sleep(0.1)
        (last,) = (await _pool_restore(saved.dir, sock, 1))["clones"]
        assert last["name"] != dead
        assert await _serial_line(last["serial"], "readmark", "MARKED") == "MARKED m-snap"
        resumed.append(last)
        with trio.fail_after(60):
            while len(list(run.glob("*.pid"))) < 8:
                await trio.sleep(0.1)
    finally:
        server.send_signal(15)
        _, err = await trio.to_thread.run_sync(lambda: server.communicate(timeout=60))
        print(err)
    assert server.returncode == 0, err
    assert err.splitlines()[-1] == f"memfs: restore pool {sock} stopped; 5 clones were resumed"
    assert f"pool: {dead}: QEMU exited while it waited; replaced" in err
    pids = {p.stem: int(p.read_text()) for p in run.glob("*.pid")}
    try:
        assert {n for n, pid in pids.items() if _pid_alive(pid)} == {c["name"] for c in resumed}
    finally:
        await _kill_and_umount(pids.values(), mnt)
