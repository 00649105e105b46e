"""A guest that boots on a memfs source mount and migrates without its RAM
being read: the mount's dirty tracking makes every pass, the final one too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import xxhash

from memfs import control
from memfs.pagemap import PageMap, PageState
from memfs.qemu import VM, file_backend
from memfs.qemu.guest import GuestImage, guest_config, read_sum
from memfs.qemu.migrate import MigrateOptions, migrate
from memfs.trace import unpack_pages
from ramimage import mounted
from test_migrate import FILL, MIB, RAM, check_sum, drop_caches, waiting_mount

pytestmark = [pytest.mark.qemu, pytest.mark.mount, pytest.mark.usefixtures("needs_fuse")]

PS = 4096


def page_hashes(region: Path) -> list[int]:
    """xxh3 of every page of a region, read through the mount (pread: the
    guest is stopped, nothing changes meanwhile)."""
    out = []
    with open(region, "rb", buffering=0) as f:
        while chunk := f.read(4 * MIB):
            out.extend(xxhash.xxh3_64_intdigest(chunk[i:i + PS])
                       for i in range(0, len(chunk), PS))
    return out


def source_mount(where: Path, vol: Path, *extra: str):
    return mounted(None, str(where), "--new", f"ram0:{RAM}", "--volume", str(vol), *extra)


async def send(mnt: Path, line: str) -> None:
    await trio.to_thread.run_sync(control.send, mnt, line)


async def test_final_pass_copies_what_the_guest_wrote(guest: GuestImage,
                                                     tmp_path: Path) -> None:
    """The pages the final pass copies are those the guest changed since the
    pass before (compared byte for byte), and hardly any more."""
    mnt, vol = tmp_path / "src", tmp_path / "vol"
    # no background passes: the passes are the test's
    with source_mount(mnt, vol, "--sync-paused"), trio.fail_after(120):
        cfg = guest_config(guest, file_backend(mnt / "ram0", RAM), "src", fill_mib=FILL)
        async with VM.start(cfg, tmp_path) as vm:
            await vm.console.expect(r"^READY", 30)
            await trio.sleep(0.5)
            s0 = await read_sum(vm.console, "s0")
            await vm.qmp.execute("stop")
            await send(mnt, "sync")       # the pass before the final one
            before = await trio.to_thread.run_sync(page_hashes, mnt / "ram0")
            await vm.qmp.execute("cont")
            await trio.sleep(1.0)
            await vm.qmp.execute("stop")
            now = await trio.to_thread.run_sync(page_hashes, mnt / "ram0")
            out = tmp_path / "final.pagemap"
            await send(mnt, f"flush {out}")
            await vm.qmp.execute("cont")
            s1 = await read_sum(vm.console, "s1", 30)
            assert s1.gen > s0.gen  # the guest wrote its work pages meanwhile
    pm = PageMap.load(out)
    copied = set(unpack_pages(pm.meta["hot"]["ram0"]))
    changed = {p for p, (a, b) in enumerate(zip(before, now)) if a != b}
    print(f"changed {len(changed)} pages, final pass copied {len(copied)}, "
          f"{len(copied - changed)} beyond the changed ones")
    assert changed and changed <= copied, sorted(changed - copied)[:20]
    # the margin: pages written back with the content they had (e.g. a flag
    # set and cleared): a small share, never the RAM
    assert len(copied - changed) <= max(64, len(changed) // 2), (len(copied), len(changed))
    r = pm.region("ram0")
    for p in sorted(changed)[:200]:
        assert r.checksums[p] == now[p] or r.states[p] == PageState.ZERO


async def test_migrate_from_source_mount(guest: GuestImage, tmp_path: Path) -> None:
    """memfs migrate from a guest on a source mount: its checksums and a page
    written just before the stop arrive; only dirty pages cross in the
    migration; the destination can move on the same way."""
    mnt, vol = tmp_path / "src", tmp_path / "vol"
    with source_mount(mnt, vol), waiting_mount(tmp_path / "d1") as d1, \
            waiting_mount(tmp_path / "d2") as d2, trio.fail_after(150):
        src_cfg = guest_config(guest, file_backend(mnt / "ram0", RAM), "src", fill_mib=FILL)
        d1_cfg = guest_config(guest, file_backend(d1 / "ram0", RAM), "d1", incoming="defer",
                              fill_mib=FILL)
        d2_cfg = guest_config(guest, file_backend(d2 / "ram0", RAM), "d2", incoming="defer",
                              fill_mib=FILL)
        async with VM.start(src_cfg, tmp_path) as src, VM.start(d1_cfg, tmp_path) as dst:
            await src.console.expect(r"^READY", 30)
            await trio.sleep(1.0)
            before = await read_sum(src.console, "before")
            await src.console.send("mark m-4711")
            await src.console.expect(r"^MARK m-4711", 10)
            opts = MigrateOptions(source_qmp=None, rams=[("ram0", str(mnt / "ram0"))],
                                  volume=None, pagemap=str(tmp_path / "one.pagemap"),
                                  dest_qmp=None, dest_mount=str(d1), passes=0, timeout=60)
            rep = await migrate(opts, src.qmp, dst.qmp)
            print(rep.text())
            assert rep.volume == str(vol)
            # the fill went to the volume while the guest ran; the migration
            # itself copied only what was dirty at the stop
            assert rep.volume_bytes_before >= FILL // 2 * MIB, rep
            assert rep.volume_bytes < 4 * MIB, rep
            assert rep.stream_counted and rep.stream_bytes < 4 * MIB, rep
            await dst.console.send("readmark")
            m = await dst.console.expect(r"^MARKED (\S*)", 30)
            assert m.group(1) == "m-4711"
            after = await read_sum(dst.console, "after", 30)
            check_sum(guest, after, before)
            await trio.to_thread.run_sync(drop_caches)
            check_sum(guest, await read_sum(dst.console, "dropped", 30), before)
            await src.qmp.execute("quit")

            # onward: the destination tracked its guest's writes too
            st1 = control.read_stats(d1)
            async with VM.start(d2_cfg, tmp_path) as dst2:
                vol2 = tmp_path / "vol2"
                opts2 = MigrateOptions(source_qmp=None, rams=[("ram0", str(d1 / "ram0"))],
                                       volume=str(vol2), pagemap=str(tmp_path / "two.pagemap"),
                                       dest_qmp=None, dest_mount=str(d2), passes=1, timeout=60)
                rep2 = await migrate(opts2, dst.qmp, dst2.qmp)
                print(rep2.text())
                st = control.read_stats(d1)
                # only pages the guest wrote on d1 went to volume 2 ...
                assert rep2.volume_bytes == st["sync_bytes"] > 0, (rep2, st)
                assert st["sync_pages"] <= st["pages_written_back"], st
                assert rep2.volume_bytes < rep.volume_bytes_before // 4, (rep, rep2)
                # ... and the pages d1 never had keep their place on volume 1
                one = PageMap.load(tmp_path / "one.pagemap").region("ram0")
                two_pm = PageMap.load(tmp_path / "two.pagemap")
                two = two_pm.region("ram0")
                v1 = two_pm.disks.index(str(vol))
                kept = [p for p in range(one.npages) if one.states[p] == PageState.REMOTE
                        and two.states[p] == PageState.REMOTE and two.disks[p] == v1]
                assert len(kept) >= st1["pages_remote"] > 1000, (len(kept), st1)
                for p in kept:
                    assert (two.offsets[p], two.checksums[p]) == (one.offsets[p],
                                                                  one.checksums[p])
                await dst2.console.send("readmark")
                m = await dst2.console.expect(r"^MARKED (\S*)", 30)
                assert m.group(1) == "m-4711"
                check_sum(guest, await read_sum(dst2.console, "two", 30), before)
                st2 = control.read_stats(d2)
                assert st2["checksum_failures"] == 0 and st2["pages_fetched"] > 0, st2
    assert os.path.getsize(vol) >= RAM
