"""``memfs migrate`` with a real QEMU: a running guest moves onto memfs.

The destination's guest RAM is a file of a memfs mount that was started
waiting for its page map (``memfs mount --region``); the guest's checksums
must be the same after the move, its later writes must survive the host
dropping its page cache, and it must be able to move on again — without the
pages the mount never handed out being read or rewritten.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from memfs import control
from memfs.mounttable import abort_connection, mounts_at
from memfs.pagemap import PageMap, PageState
from memfs.qemu import VM, file_backend, qemu_binary
from memfs.qemu.guest import (GuestImage, GuestSum, expected_fill_md5,
                              expected_work_md5, guest_config, read_sum)
from memfs.qemu.migrate import MigrateOptions, MigrateReport, migrate
from ramimage import thread_stacks

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

FILL = 32             # MiB of known data in the guest
RAM = 128 << 20       # guest RAM
MIB = 1 << 20


# the guest and shm fixtures live in conftest.py


#: the mount daemon, in front, with MountOptions a test chooses (the CLI has
#: no switch for every option)
_MOUNT = """
import json, sys, trio
from dataclasses import fields
from memfs.logs import setup_logging
from memfs.daemon import Daemon, MountOptions
mnt, size, store, log, extra = sys.argv[1:]
setup_logging(False, log)
known = {f.name for f in fields(MountOptions)}
opts = MountOptions(mountpoint=mnt, regions={"ram0": int(size)}, store_dir=store,
                    **{k: v for k, v in json.loads(extra).items() if k in known})
trio.run(Daemon(opts).run)
"""


def fuse_abort(mnt: Path) -> None:
    """Abort the FUSE connection of ``mnt`` (a hung daemon cannot hang us)."""
    for entry in mounts_at(mnt):
        abort_connection(entry)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=10)


@contextmanager
def waiting_mount(where: Path, size: int = RAM, **opts: object) -> Iterator[Path]:
    """A memfs mount serving region ram0 and waiting for its page map; no
    background completion unless ``prefetch=True`` (tests count pages)."""
    mnt = where / "mnt"
    mnt.mkdir(parents=True)
    extra = {"prefetch": False, **opts}
    proc = subprocess.Popen([sys.executable, "-c", _MOUNT, str(mnt), str(size),
                             str(where / "store"), str(where / "memfs.log"), json.dumps(extra)])
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(mnt / ".memfs" / "pid"):
            assert proc.poll() is None, (where / "memfs.log").read_text()
            assert time.monotonic() < deadline, "the mount did not come up"
            time.sleep(0.05)
        yield mnt
    finally:
        try:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=10)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            print(f"the mount at {mnt} did not stop:\n{thread_stacks(proc.pid)}")
            fuse_abort(mnt)
            proc.kill()
            proc.wait(timeout=10)
        if os.path.ismount(mnt):
            fuse_abort(mnt)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def check_sum(image: GuestImage, s: GuestSum, before: GuestSum) -> None:
    assert s.fill == before.fill == expected_fill_md5(image, FILL)
    assert s.gen >= before.gen
    assert s.work == expected_work_md5(image, s.gen)


def check_report(rep: MigrateReport) -> None:
    assert rep.stream_counted and 0 < rep.stream_bytes < 4 * MIB, rep  # no RAM in it
    assert rep.downtime_ms > 0 and rep.total_ms >= rep.downtime_ms
    assert len(rep.passes) == 2
    assert rep.pages_total == RAM // 4096


async def migrate_onto(src: VM, src_ram: Path, dst: VM, mnt: Path, work: Path,
                       volume: Path) -> MigrateReport:
    opts = MigrateOptions(source_qmp=None, rams=[("ram0", str(src_ram))], volume=str(volume),
                          pagemap=str(work / f"{volume.stem}.pagemap"), dest_qmp=None,
                          dest_mount=str(mnt), passes=1, timeout=60)
    rep = await migrate(opts, src.qmp, dst.qmp)
    print(rep.text())
    return rep


@pytest.mark.parametrize("share, prefetch", [(True, False), (False, False), (True, True)],
                         ids=["share-on", "share-off", "share-on-prefetch"])
async def test_migrate_onto_memfs(guest: GuestImage, shm: Path, tmp_path: Path,
                                  share: bool, prefetch: bool) -> None:
    src_ram = shm / "src.ram"
    src_cfg = guest_config(guest, file_backend(src_ram, RAM), "src", fill_mib=FILL)
    with waiting_mount(tmp_path / "m1", prefetch=prefetch) as mnt, trio.fail_after(90):
        dst_cfg = guest_config(guest, file_backend(mnt / "ram0", RAM, share=share), "dst",
                               incoming="defer", fill_mib=FILL)
        async with VM.start(src_cfg, tmp_path) as src, VM.start(dst_cfg, tmp_path) as dst:
            await src.console.expect(r"^READY", 30)
            await trio.sleep(0.5)
            before = await read_sum(src.console, "before")
            rep = await migrate_onto(src, src_ram, dst, mnt, tmp_path, tmp_path / "vol1")
            check_report(rep)
            # non-zero pages went to the volume, most of them are still remote
            assert rep.volume_bytes >= FILL // 2 * MIB, rep
            if not prefetch:
                assert rep.pages_remote_at_resume > FILL * 256 // 2, rep
            assert (await dst.qmp.execute("query-status"))["status"] == "running"
            after = await read_sum(dst.console, "after", 30)
            check_sum(guest, after, before)
            st = control.read_stats(mnt)
            assert st["pages_fetched"] > 0 and st["checksum_failures"] == 0, st

            # the guest keeps writing; its pages leave the host page cache
            await trio.sleep(1)
            mid = await read_sum(dst.console, "mid", 30)
            assert mid.gen > after.gen
            await trio.to_thread.run_sync(drop_caches)
            if share:   # write-back reached the mount and its local store
                assert control.read_stats(mnt)["writes"] > 0
            later = await read_sum(dst.console, "later", 30)
            check_sum(guest, later, before)
            assert later.gen > mid.gen
            if prefetch:  # background completion ran beside the guest
                while not control.read_stats(mnt)["prefetch_done"]:
                    await trio.sleep(0.1)
                st = control.read_stats(mnt)
                assert st["pages_remote"] == 0 and st["pages_prefetched"] > 0, st
                await trio.to_thread.run_sync(drop_caches)
                last = await read_sum(dst.console, "last", 30)
                check_sum(guest, last, before)


async def test_migrate_onward_keeps_remote_pages(guest: GuestImage, shm: Path,
                                                 tmp_path: Path) -> None:
    """source -> memfs mount 1 -> memfs mount 2.  In the second move, the pages
    mount 1 never handed out are not read: they keep their place on volume 1."""
    src_ram = shm / "src.ram"
    src_cfg = guest_config(guest, file_backend(src_ram, RAM), "src", fill_mib=FILL)
    vol1, vol2 = tmp_path / "vol1", tmp_path / "vol2"
    with waiting_mount(tmp_path / "m1") as mnt1, waiting_mount(tmp_path / "m2") as mnt2, \
            trio.fail_after(90):
        cfg1 = guest_config(guest, file_backend(mnt1 / "ram0", RAM), "dst1", incoming="defer",
                            fill_mib=FILL)
        cfg2 = guest_config(guest, file_backend(mnt2 / "ram0", RAM), "dst2", incoming="defer",
                            fill_mib=FILL)
        async with VM.start(src_cfg, tmp_path) as src, VM.start(cfg1, tmp_path) as dst1:
            await src.console.expect(r"^READY", 30)
            await trio.sleep(0.5)
            before = await read_sum(src.console, "before")
            rep1 = await migrate_onto(src, src_ram, dst1, mnt1, tmp_path, vol1)
            check_report(rep1)
            check_sum(guest, await read_sum(dst1.console, "one", 30), before)
            await src.qmp.execute("quit")
            map1 = PageMap.load(tmp_path / "vol1.pagemap").region("ram0")

            async with VM.start(cfg2, tmp_path) as dst2:
                rep2 = await migrate_onto(dst1, mnt1 / "ram0", dst2, mnt2, tmp_path, vol2)
                check_report(rep2)
                check_sum(guest, await read_sum(dst2.console, "two", 30), before)
                await dst1.qmp.execute("quit")

                # what mount 1 never handed out, now that its guest is gone
                await trio.to_thread.run_sync(control.save, mnt1, tmp_path / "view")
                view = PageMap.load(tmp_path / "view").region("ram0")
                st1 = control.read_stats(mnt1)
                final = rep2.passes[-1]
                never = [p for p in range(view.npages) if view.states[p] == PageState.REMOTE]
                assert len(never) == st1["pages_remote"] > 1000, st1
                # no pass read RAM: mount 1 knew what its guest wrote, and
                # copied exactly that to volume 2
                assert final["source"] == "mount", final
                assert rep2.volume_bytes == st1["sync_bytes"] > 0, (rep2, st1)
                assert st1["sync_pages"] <= st1["pages_written_back"], st1
                # ... and keep their location on volume 1 (and their checksum)
                pm2 = PageMap.load(tmp_path / "vol2.pagemap")
                map2 = pm2.region("ram0")
                v1 = pm2.disks.index(str(vol1))
                for p in never:
                    assert map2.states[p] == PageState.REMOTE
                    assert (map2.disks[p], map2.offsets[p], map2.checksums[p]) == \
                        (v1, map1.offsets[p], map1.checksums[p])
                # pages it fetched and the guest did not change point at volume
                # 1 still: volume 2 gets only the pages the guest changed
                on1 = sum(1 for p in range(map2.npages) if map2.states[p] == PageState.REMOTE
                          and map2.disks[p] == v1)
                assert on1 > len(never), (on1, len(never))
                assert sum(p["pages_written"] for p in rep2.passes) * 4096 == rep2.volume_bytes
                assert rep2.volume_bytes < rep1.volume_bytes // 4, (rep1, rep2)

                # the guest on mount 2 runs on, through a dropped page cache
                await trio.to_thread.run_sync(drop_caches)
                later = await read_sum(dst2.console, "later", 30)
                check_sum(guest, later, before)
                st2 = control.read_stats(mnt2)
                assert st2["checksum_failures"] == 0 and st2["pages_fetched"] > 0


@pytest.mark.slow
def test_bench_migrate_memfs_row(tmp_path: Path) -> None:
    """tools/bench-migrate's memfs row runs end to end (small guest)."""
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    out = tmp_path / "bench.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(repo / "tools" / "bench-migrate"), "--fill", "16", "--only",
         "memfs", "--settle", "1", "--after", "1", "--timeout", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (r,) = json.loads(out.read_text())["results"]
    assert r["ok"] is True, r
    assert r["volume_bytes"] > 8 * MIB and r["stream_bytes"] < 4 * MIB, r
    assert r["src_bytes"] == r["volume_bytes"] + r["stream_bytes"], r
    assert r["downtime_ms"] > 0 and r["src_free_s"] > 0 and r["stall_ms"] > 0, r
    assert "memfs" in proc.stdout and "vol_MiB" in proc.stdout
