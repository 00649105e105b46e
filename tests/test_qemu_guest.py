"""The test guest, the QMP client and plain QEMU migrations with a real QEMU.

These prove the pieces ``memfs migrate`` stands on: the guest's data is what
the host expects, its checksums survive a migration whose RAM is shared
(x-ignore-shared: the RAM is not in the stream), and QMP errors surface.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from memfs.qemu import VM, QMPClosed, QMPError, file_backend, memfd_backend
from memfs.qemu.guest import (GuestImage, expected_fill_md5, expected_work_md5,
                              guest_config, read_sum)
from memfs.qemu.plain import migrate_and_wait, migrate_incoming, set_capabilities

pytestmark = pytest.mark.qemu

FILL = 48           # MiB of known data in the guest
RAM = 160 << 20     # guest RAM


# the guest and shm fixtures live in conftest.py


async def test_guest_data_matches_model(guest: GuestImage, shm: Path, tmp_path: Path) -> None:
    cfg = guest_config(guest, file_backend(shm / "ram", RAM), "g", fill_mib=FILL)
    with trio.fail_after(60):
        async with VM.start(cfg, tmp_path) as vm:
            await vm.console.expect(r"^READY fill=48 ", 30)
            s1 = await read_sum(vm.console, "one")
            assert s1.fill == expected_fill_md5(guest, FILL)
            assert s1.work == expected_work_md5(guest, s1.gen)
            await trio.sleep(1)
            s2 = await read_sum(vm.console, "two")
            assert s2.gen > s1.gen, "the workload is not running"
            assert s2.fill == s1.fill
            assert s2.work == expected_work_md5(guest, s2.gen)
            assert len(vm.console.ticks) > 5
            assert (await vm.console.command("ping x", r"^PONG x$")).group(0) == "PONG x"
            with pytest.raises(QMPError, match="has not been found"):
                await vm.qmp.execute("no-such-command")
            with pytest.raises(QMPError):
                await vm.qmp.execute("migrate-incoming", {"uri": "unix:/nonexistent"})
            await vm.qmp.execute("stop")
            assert (await vm.qmp.wait_event("STOP", timeout=10))["event"] == "STOP"
            await vm.qmp.execute("cont")
            await vm.qmp.wait_event("RESUME", timeout=10)
            assert (await vm.qmp.execute("query-status"))["status"] == "running"


async def test_qemu_killed_on_error(guest: GuestImage, shm: Path, tmp_path: Path) -> None:
    """An exception inside VM.start still ends QEMU; a dead QEMU fails QMP calls."""
    cfg = guest_config(guest, file_backend(shm / "ram", RAM), "g", fill_mib=4)
    with trio.fail_after(30):
        with pytest.raises(KeyError):
            async with VM.start(cfg, tmp_path) as vm:
                raise KeyError("boom")
        assert vm.process.returncode is not None
        async with VM.start(cfg, tmp_path) as vm:
            vm.process.kill()
            await vm.process.wait()
            with pytest.raises(QMPClosed):
                await vm.qmp.execute("query-status")


@pytest.mark.parametrize("dest", ["same-file", "copy-share-off"])
async def test_migrate_x_ignore_shared(guest: GuestImage, shm: Path, tmp_path: Path,
                                       dest: str) -> None:
    """Source RAM in /dev/shm (share=on). The destination maps the same file, or
    a copy made while the source is stopped (share=off: private, read-only use).
    The guest's fixed data and its workload's area must survive; the stream must
    not carry the RAM."""
    src_ram = shm / "src.ram"
    sock = str(tmp_path / "mig.sock")
    src_cfg = guest_config(guest, file_backend(src_ram, RAM), "src", fill_mib=FILL)
    with trio.fail_after(90):
        async with VM.start(src_cfg, tmp_path) as src:
            await src.console.expect(r"^READY", 30)
            await trio.sleep(0.5)
            before = await read_sum(src.console, "before")
            assert before.fill == expected_fill_md5(guest, FILL)
            if dest == "same-file":
                dst_mem = file_backend(src_ram, RAM, share=True)
            else:
                await src.qmp.execute("stop")
                shutil.copyfile(src_ram, shm / "dst.ram")
                dst_mem = file_backend(shm / "dst.ram", RAM, share=False)
            dst_cfg = guest_config(guest, dst_mem, "dst", incoming="defer", paused=True,
                                   fill_mib=FILL)
            async with VM.start(dst_cfg, tmp_path) as dst:
                for qmp in (src.qmp, dst.qmp):
                    await set_capabilities(qmp, x_ignore_shared=True)
                await migrate_incoming(dst.qmp, f"unix:{sock}")
                watch = await migrate_and_wait(src.qmp, f"unix:{sock}", timeout=60)
                info = watch.info
                assert info["status"] == "completed"
                assert info["ram"]["transferred"] < 8 << 20, info["ram"]
                await dst.wait_status("paused", 30)
                await dst.qmp.execute("cont")
                await dst.wait_status("running", 10)
                after = await read_sum(dst.console, "after", timeout=60)
                assert after.fill == before.fill
                assert after.gen >= before.gen
                assert after.work == expected_work_md5(guest, after.gen)
                await trio.sleep(0.5)
                later = await read_sum(dst.console, "later")
                assert later.gen > after.gen, "the workload stopped after migration"
                assert later.work == expected_work_md5(guest, later.gen)
                assert later.fill == before.fill
    assert not os.path.exists(src.qmp_path) or src.process.returncode is not None


async def test_memfd_ram_is_readable(guest: GuestImage, tmp_path: Path) -> None:
    """With a memfd backend, the guest RAM is a file the host can read."""
    cfg = guest_config(guest, memfd_backend(RAM), "m", fill_mib=8)
    with trio.fail_after(60):
        async with VM.start(cfg, tmp_path) as vm:
            await vm.console.expect(r"^READY", 30)
            path = vm.memfd_path()
            assert os.stat(path).st_size == RAM
            with open(path, "rb") as f:
                ram = f.read()
            # the guest's random block sits in its RAM (page cache of /rand.bin)
            assert guest.rand.read_bytes()[:4096] in ram
