"""``memfs migrate --disk/--index`` with a real guest (issues 4 and 6).

The guest reads its whole virtio-blk disk (random content) into its page
cache.  A QMP blockdev-snapshot-sync freezes the disk: the qcow2 image becomes
a read-only base (served by qemu-nbd --read-only, indexed by memfs index), a
new overlay takes the guest's writes.  A plain capture of the running guest
gives the volume bytes without references; then the guest migrates onto a
memfs mount with the disk and its index: the volume bytes drop by about the
disk's size, the destination reads those pages from the disk, and the
guest's checksums (RAM data, and the disk read back) equal those before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from memfs import control
from memfs.qemu import VM, file_backend
from memfs.qemu.guest import GuestImage, expected_work_md5, guest_config, read_sum
from memfs.qemu.migrate import MigrateOptions, migrate
from nbdserver import qemu_nbd
from ramimage import memfs
from test_index_guest import disk_args, make_disk, read_disk_then_freeze
from test_migrate import waiting_mount

pytestmark = [pytest.mark.qemu, pytest.mark.nbd, pytest.mark.mount]

FILL = 16              # MiB of known data in the guest's tmpfs
RAM = 256 << 20        # guest RAM
DISK = 32 << 20        # the guest's disk (make_disk: random content)


def test_migrate_disk_needs_index() -> None:
    res = subprocess.run([sys.executable, "-m", "memfs.cli", "migrate", "--source-qmp", "x",
                          "--ram", "/nonexistent", "--volume", "v", "--pagemap", "p",
                          "--dest-qmp", "y", "--dest-mount", "/nonexistent",
                          "--disk", "/nonexistent"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--index" in res.stderr, res.stderr


# the reference disk's server stops (end of its with block) before the mount does
@pytest.mark.expect_log(r"connection \d+ dropped: server closed the connection")
async def test_migrate_with_disk_references(guest: GuestImage, shm: Path,
                                            tmp_path: Path) -> None:
    image, disk_md5 = make_disk(tmp_path)
    overlay = tmp_path / "overlay.qcow2"
    src_ram = shm / "src.ram"
    src_cfg = guest_config(guest, file_backend(src_ram, RAM), "src", fill_mib=FILL)
    src_cfg.extra_args += disk_args(image)
    with waiting_mount(tmp_path / "m", size=RAM) as mnt, trio.fail_after(150):
        async with VM.start(src_cfg, tmp_path) as src:
            before = await read_disk_then_freeze(src, image, disk_md5, overlay, 90)
            with qemu_nbd(str(image), "qcow2", read_only=True) as srv:
                idx = str(tmp_path / "disk.idx")
                memfs("index", srv.uri, "--out", idx, "--no-progress")

                # without references: a plain capture of the same (running) guest
                plain = json.loads(memfs(
                    "capture", "--json", "--no-progress", "--ram", f"ram0={src_ram}",
                    "--volume", str(tmp_path / "plain.vol"),
                    "--out", str(tmp_path / "plain.pm")).stdout)
                (tmp_path / "plain.vol").unlink()

                dst_cfg = guest_config(guest, file_backend(mnt / "ram0", RAM), "dst",
                                       incoming="defer", fill_mib=FILL)
                dst_cfg.extra_args += disk_args(overlay)
                async with VM.start(dst_cfg, tmp_path) as dst:
                    opts = MigrateOptions(
                        source_qmp=None, rams=[("ram0", str(src_ram))],
                        volume=str(tmp_path / "ref.vol"),
                        pagemap=str(tmp_path / "ref.pagemap"), dest_qmp=None,
                        dest_mount=str(mnt), passes=1, timeout=60, disk=srv.uri, index=idx)
                    rep = await migrate(opts, src.qmp, dst.qmp)
                    print(rep.text())
                    saved = plain["bytes_written"] - rep.volume_bytes
                    print(f"volume bytes without the index: {plain['bytes_written']}, with "
                          f"it: {rep.volume_bytes} (saved {saved}; disk {DISK})")
                    assert rep.pages_referenced >= 0.9 * DISK // 4096, rep
                    assert 0.85 * DISK <= saved <= 1.1 * DISK, (plain, rep.as_dict())
                    assert rep.stream_counted and rep.stream_bytes < 4 << 20, rep
                    # the destination's map points at the disk for those pages
                    st = control.read_stats(mnt)
                    assert st["pages_on_disks"] >= 0.8 * DISK // 4096, st
                    await src.qmp.execute("quit")

                    after = await read_sum(dst.console, "after", timeout=60)
                    assert after.fill == before.fill
                    assert after.work == expected_work_md5(guest, after.gen)
                    m = await dst.console.command("readdisk", r"^(READDISK .*|ERR.*)",
                                                  timeout=90)
                    assert m.group(0) == f"READDISK /dev/vda md5={disk_md5}"
                    st = control.read_stats(mnt)
                    assert st.get("checksum_failures", 0) == 0, st
                    await dst.qmp.execute("quit")
