"""Disk references with a real guest (issue 6).

The guest reads its whole virtio-blk disk (random content) into its page
cache.  The disk is a qcow2 image; a QMP blockdev-snapshot-sync freezes it
into a read-only base (served by qemu-nbd --read-only, indexed by memfs
index) plus an overlay that takes the guest's new writes.  With the source
stopped, capture runs without and with the index: the volume bytes drop by
about the disk's size.  The guest then migrates onto a memfs mount of the
referencing page map (x-ignore-shared), and its checksums — of its RAM data
and of its disk, read back from its page cache — equal those before.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from memfs.qemu import VM, file_backend
from memfs.qemu.guest import (GuestImage, GuestSum, expected_work_md5, guest_config,
                              read_sum)
from memfs.qemu.plain import migrate_and_wait, migrate_incoming, set_capabilities
from nbdserver import qemu_nbd
from ramimage import memfs, mounted

pytestmark = [pytest.mark.qemu, pytest.mark.nbd, pytest.mark.slow]

FILL = 16              # MiB of known data in the guest's tmpfs
RAM = 256 << 20        # guest RAM
DISK = 32 << 20        # the guest's disk: random content


# the guest and shm fixtures live in conftest.py


def disk_args(image: Path) -> list[str]:
    return ["-blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,"
                         f"file.filename={image}",
            "-device", "virtio-blk-pci,drive=disk0,id=vblk0"]


def make_disk(tmp: Path) -> tuple[Path, str]:
    raw = tmp / "disk.raw"
    raw.write_bytes(random.Random(2024).randbytes(DISK))
    md5 = hashlib.md5(raw.read_bytes()).hexdigest()
    image = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(image)], check=True, timeout=60)
    raw.unlink()
    return image, md5


async def read_disk_then_freeze(src: VM, image: Path, disk_md5: str, overlay: Path,
                                 readdisk_timeout: float = 120) -> GuestSum:
    """The guest reads its whole disk (into its page cache), its checksums
    are taken, then the disk is frozen: the image becomes a read-only base
    and the overlay takes the guest's writes from now on."""
    await src.console.expect(r"^READY", 60)
    m = await src.console.command("readdisk", r"^(READDISK /dev/vda md5=(\w+)|ERR.*)",
                                  timeout=readdisk_timeout)
    assert m.group(2) == disk_md5, m.group(0)
    before = await read_sum(src.console, "before")
    await src.qmp.execute("blockdev-snapshot-sync", {
        "node-name": "disk0", "snapshot-file": str(overlay),
        "snapshot-node-name": "overlay0", "format": "qcow2"})
    os.chmod(image, 0o444)
    return before


def capture_json(*args: str) -> dict:
    return json.loads(memfs("capture", "--json", "--no-progress", *args).stdout)


async def test_capture_references_guest_disk(guest: GuestImage, shm: Path,
                                             tmp_path: Path) -> None:
    image, disk_md5 = make_disk(tmp_path)
    overlay = tmp_path / "overlay.qcow2"
    src_ram = shm / "src.ram"
    src_cfg = guest_config(guest, file_backend(src_ram, RAM), "src", fill_mib=FILL)
    src_cfg.extra_args += disk_args(image)
    with trio.fail_after(240):
        async with VM.start(src_cfg, tmp_path) as src:
            before = await read_disk_then_freeze(src, image, disk_md5, overlay)
            with qemu_nbd(str(image), "qcow2", read_only=True) as srv:
                idx = str(tmp_path / "disk.idx")
                out = memfs("index", srv.uri, "--out", idx, "--no-progress").stdout
                assert f"indexed {DISK} bytes" in out, out

                await src.qmp.execute("stop")
                ram = f"ram0={src_ram}"
                plain = capture_json("--ram", ram, "--volume", str(tmp_path / "plain.vol"),
                                     "--out", str(tmp_path / "plain.pm"))
                refd = capture_json("--ram", ram, "--volume", str(tmp_path / "ref.vol"),
                                    "--out", str(tmp_path / "ref.pm"),
                                    "--disk", srv.uri, "--index", idx)
                saved = plain["bytes_written"] - refd["bytes_written"]
                print(f"volume bytes without the index: {plain['bytes_written']}, with it: "
                      f"{refd['bytes_written']} (saved {saved}; {refd['pages_referenced']} "
                      f"pages referenced; disk {DISK})")
                assert plain["pages_referenced"] == 0
                assert saved == refd["pages_referenced"] * 4096
                assert 0.9 * DISK <= saved <= 1.1 * DISK, (plain, refd)

                # Migrate onto memfs: RAM from the referencing page map.
                mnt = tmp_path / "mnt"
                with mounted(str(tmp_path / "ref.pm"), str(mnt)):
                    stats = json.loads((mnt / ".memfs" / "stats.json").read_text())
                    assert stats["pages_on_disks"] == refd["pages_referenced"]
                    assert stats["pages_on_volume"] == refd["pages_written"]
                    dst_cfg = guest_config(guest, file_backend(mnt / "ram0", RAM), "dst",
                                           incoming="defer", paused=True, fill_mib=FILL)
                    dst_cfg.extra_args += disk_args(overlay)
                    async with VM.start(dst_cfg, tmp_path) as dst:
                        sock = str(tmp_path / "mig.sock")
                        for qmp in (src.qmp, dst.qmp):
                            await set_capabilities(qmp, x_ignore_shared=True)
                        await migrate_incoming(dst.qmp, f"unix:{sock}")
                        watch = await migrate_and_wait(src.qmp, f"unix:{sock}", timeout=60)
                        assert watch.info["ram"]["transferred"] < 8 << 20
                        await dst.wait_status("paused", 30)
                        await src.qmp.execute("quit")
                        await dst.qmp.execute("cont")
                        after = await read_sum(dst.console, "after", timeout=120)
                        assert after.fill == before.fill
                        assert after.work == expected_work_md5(guest, after.gen)
                        m = await dst.console.command("readdisk", r"^(READDISK .*|ERR.*)",
                                                      timeout=120)
                        assert m.group(0) == f"READDISK /dev/vda md5={disk_md5}"
                        stats = json.loads((mnt / ".memfs" / "stats.json").read_text())
                        assert stats["bytes_fetched"] >= 0.9 * DISK, stats
                        assert stats.get("checksum_failures", 0) == 0
                        await dst.qmp.execute("quit")


def test_bench_index_smoke(guest: GuestImage) -> None:
    """tools/bench-index runs and reports the saving (small sizes); with this
    Python (the venv's), not whatever ``python3`` its #! line finds on PATH."""
    res = subprocess.run([sys.executable,
                          str(Path(__file__).resolve().parents[1] / "tools" / "bench-index"),
                          "--disk", "16", "--fill", "8", "--ram", "160", "--json", "-"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["plain"]["pages_referenced"] == 0
    assert r["saved_of_disk"] > 0.9, r
