"""A source mount (``memfs mount --new``): the kernel's write-back tells the
daemon which pages changed; they are copied to the volume in the background,
and a flush makes a page map without reading RAM."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
import xxhash

from memfs import control
from memfs.pagemap import PageMap, PageState
from memfs.trace import unpack_pages
from ramimage import PS, drop_caches, memfs, mounted, read_stat

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("needs_fuse")]

NPAGES = 2048


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PS)


def write_pages(region: str, pages: dict[int, bytes], sync: bool) -> None:
    """Write through a shared mapping, as a guest does; ``sync``: msync, so
    the WRITEs reach the daemon now instead of at write-back time."""
    fd = os.open(region, os.O_RDWR)
    try:
        m = mmap.mmap(fd, NPAGES * PS, mmap.MAP_SHARED)
        for p, data in pages.items():
            m[p * PS:(p + 1) * PS] = data
        if sync:
            m.flush()
        m.close()
    finally:
        os.close(fd)


#: a process that writes pages through a shared mapping and keeps it until
#: told to go: its dirty pages reach the daemon only by write-back or fsync
HOLDER = """
import mmap, os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, int(sys.argv[2]), mmap.MAP_SHARED)
for item in sys.argv[3].split(","):
    p, seed = map(int, item.split(":"))
    m[p * 4096:(p + 1) * 4096] = random.Random(seed).randbytes(4096) if seed >= 0 else bytes(4096)
print("written", flush=True)
sys.stdin.readline()
"""


@contextmanager
def holding_writes(region: str, seeds: dict[int, int]) -> Iterator[None]:
    """``seeds``: page -> seed of its content (page(seed)), -1 for zeros."""
    spec = ",".join(f"{p}:{s}" for p, s in seeds.items())
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, region, str(NPAGES * PS), spec],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "written\n"
        yield
    finally:
        proc.communicate("go\n", timeout=30)


def wait_for(what, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_writes_are_tracked_copied_and_flushed(tmp_path) -> None:
    mnt, vol = str(tmp_path / "src"), str(tmp_path / "vol")
    region = os.path.join(mnt, "ram0")
    expect = bytearray(NPAGES * PS)
    rnd = random.Random(5)
    first = {p: page(p) for p in rnd.sample(range(NPAGES), 300)}
    with mounted(None, mnt, "--new", f"ram0:{NPAGES * PS}", "--volume", vol,
                 "--sync-paused"):
        write_pages(region, first, sync=True)
        for p, data in first.items():
            expect[p * PS:(p + 1) * PS] = data
        # paused: the daemon knows exactly these pages, and copied none
        assert read_stat(mnt, "pages_dirty") == len(first)
        assert read_stat(mnt, "sync_bytes") == 0
        control.send(mnt, "sync-resume")
        # a pass ends with the volume's flush
        wait_for(lambda: read_stat(mnt, "sync_passes") >= 1)
        assert read_stat(mnt, "pages_dirty") == 0
        assert read_stat(mnt, "sync_bytes") == len(first) * PS

        # later writes, with the background copy paused: the flush copies them
        control.send(mnt, "sync-pause")
        seeds = {p: 10_000 + p for p in rnd.sample(range(NPAGES), 100)}
        seeds[0] = -1                     # written as zeros: a zero page again
        later = {p: page(s) if s >= 0 else bytes(PS) for p, s in seeds.items()}
        for p, data in later.items():
            expect[p * PS:(p + 1) * PS] = data
        out = str(tmp_path / "flushed.pagemap")
        with holding_writes(region, seeds):
            # still dirty in the page cache: only the flush's fsync brings them
            memfs("capture", "--from-mount", mnt, "--out", out)
            assert read_stat(mnt, "pages_dirty") == 0

    pm = PageMap.load(out)
    (r,) = pm.regions
    assert pm.disks == [vol] and pm.meta["source"] == "mount"
    # the page map names the volume by the identity the volume holds
    assert list(pm.meta["volumes"]) == [vol]
    written = set(first) | set(later)
    for p in range(NPAGES):
        data = bytes(expect[p * PS:(p + 1) * PS])
        if p in written and any(data):
            assert r.states[p] == PageState.REMOTE, p
            assert r.checksums[p] == xxhash.xxh3_64_intdigest(data), p
            with open(vol, "rb") as f:
                f.seek(r.offsets[p])
                assert f.read(PS) == data, p
        else:
            assert r.states[p] == PageState.ZERO, p
    # the final pass copied what the guest wrote since the last copy: "hot"
    hot = set(unpack_pages(pm.meta["hot"]["ram0"]))
    assert hot == set(later), (len(hot), len(later))

    # a destination serves exactly what the guest wrote
    dst = str(tmp_path / "dst")
    with mounted(out, dst):
        drop_caches()
        with open(os.path.join(dst, "ram0"), "rb") as f:
            assert f.read() == bytes(expect)
        assert read_stat(dst, "checksum_failures") == 0


def test_flush_survives_eviction(tmp_path) -> None:
    """Pages the guest wrote come back from the store after the host dropped
    the region's page cache (the store's own cache is dropped by the trim)."""
    mnt, vol = str(tmp_path / "src"), str(tmp_path / "vol")
    region = os.path.join(mnt, "ram0")
    pages = {p: page(p) for p in range(0, NPAGES, 7)}
    with mounted(None, mnt, "--new", f"ram0:{NPAGES * PS}", "--volume", vol):
        write_pages(region, pages, sync=True)
        drop_caches()
        with open(region, "rb") as f:
            for p, data in pages.items():
                f.seek(p * PS)
                assert f.read(PS) == data, p


@pytest.mark.expect_log("control command failed: ")
def test_rate_and_volume_errors(tmp_path, ram) -> None:
    path, data = ram
    res = memfs("mount", "--new", "ram0:4M", str(tmp_path), check=False)
    assert res.returncode == 2
    assert "--new needs --volume URI" in res.stderr
    # a mount whose page map refers to the volume cannot copy pages into it
    vol = str(tmp_path / "vol")
    pm = str(tmp_path / "vm.pagemap")
    memfs("capture", "--ram", path, "--volume", vol, "--out", pm)
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt, "--no-prefetch"):
        with pytest.raises(control.ControlError, match="is a disk of the page map"):
            control.send(mnt, f"volume {vol}")
        with pytest.raises(control.ControlError, match="no volume"):
            control.send(mnt, f"flush {tmp_path}/x.pagemap")
        control.send(mnt, f"volume {tmp_path}/vol2")
        control.send(mnt, "sync-rate 1M")
        assert read_stat(mnt, "sync_rate") == 1 << 20
        # a destination mount's flush: its remote pages keep their place
        out = str(tmp_path / "onward.pagemap")
        control.send(mnt, f"flush {out}")
        onward = PageMap.load(out)
        assert onward.disks[0] == vol
        orig = PageMap.load(pm).region("ram0")
        assert onward.region("ram0").states == orig.states
        assert onward.region("ram0").offsets == orig.offsets


def test_dirty_pages_survive_a_daemon_kill(tmp_path) -> None:
    """A source mount under a supervisor (issue 10's takeover): the daemon
    dies with pages written back but not yet copied; the next daemon knows
    they are dirty, and the flush carries every one of them."""
    from test_takeover import kill_daemon, supervised
    mnt, vol, state = str(tmp_path / "src"), str(tmp_path / "vol"), str(tmp_path / "state")
    region = os.path.join(mnt, "ram0")
    pages = {p: page(20_000 + p) for p in random.Random(9).sample(range(NPAGES), 200)}
    with supervised(["--state", state, "--new", f"ram0:{NPAGES * PS}", "--volume", vol,
                     "--sync-paused", mnt], mnt, str(tmp_path / "log")):
        write_pages(region, pages, sync=True)
        assert read_stat(mnt, "pages_dirty") == len(pages)
        kill_daemon(state, mnt)
        assert read_stat(mnt, "pages_dirty") >= len(pages)  # journal: written, not copied
        out = str(tmp_path / "after-kill.pagemap")
        memfs("capture", "--from-mount", mnt, "--out", out)
    r = PageMap.load(out).region("ram0")
    with open(vol, "rb") as f:
        for p, data in pages.items():
            assert r.states[p] == PageState.REMOTE, p
            assert r.checksums[p] == xxhash.xxh3_64_intdigest(data), p
            f.seek(r.offsets[p])
            assert f.read(PS) == data, p
    assert r.count(PageState.REMOTE) == len(pages)
