"""Real mounts through the kernel: what a reader, a mapping and QEMU see."""

from __future__ import annotations

import concurrent.futures
import json
import mmap
import os
import random
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from memfs.capture import layout
from memfs.pagemap import PageMap, PageState
from nbdserver import make_image, qemu_nbd_server
from ramimage import PS, drop_caches, is_mounted, memfs, mounted, read_stat

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("needs_fuse")]


@contextmanager
def volume(kind: str, tmp_path, size: int) -> Iterator[str]:
    """A migration volume: a plain file, or the same file exported by qemu-nbd."""
    path = str(tmp_path / "vol.img")
    if kind == "file":
        yield path
        return
    make_image(path, layout([size])[-1])
    with qemu_nbd_server(path, fmt="raw") as uri:
        yield uri


@pytest.fixture(params=["file", "nbd"])
def captured(request, tmp_path, ram) -> Iterator[tuple[str, bytes, str]]:
    """(page map, RAM bytes, volume URI), captured with the CLI."""
    path, data = ram
    with volume(request.param, tmp_path, len(data)) as vol:
        pm = str(tmp_path / "vm.pagemap")
        memfs("capture", "--ram", path, "--volume", vol, "--out", pm)
        yield pm, data, vol


def test_mmap_reads_equal_the_captured_ram(captured, tmp_path) -> None:
    pm, data, _ = captured
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt):
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            order = list(range(len(data) // PS))
            random.Random(7).shuffle(order)
            for p in order[:300]:  # random first touches
                assert m[p * PS:(p + 1) * PS] == data[p * PS:(p + 1) * PS], f"page {p}"
            assert m[:] == data  # and everything, sequentially
            m.close()
        assert read_stat(mnt, "checksum_failures") == 0
        assert read_stat(mnt, "pages_remote") == 0


def test_threads_reading_at_once(captured, tmp_path) -> None:
    pm, data, _ = captured
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt):
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDONLY)
        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)

        def worker(seed: int) -> int:
            rnd = random.Random(seed)
            for _ in range(200):
                p = rnd.randrange(len(data) // PS)
                assert m[p * PS:(p + 1) * PS] == data[p * PS:(p + 1) * PS]
                q = rnd.randrange(len(data) // PS)
                assert os.pread(fd, PS, q * PS) == data[q * PS:(q + 1) * PS]
            return seed

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            assert sorted(ex.map(worker, range(8))) == list(range(8))
        m.close()
        os.close(fd)


def test_shared_mapping_writes_survive_drop_caches(captured, tmp_path) -> None:
    pm, data, _ = captured
    mnt = str(tmp_path / "mnt")
    want = bytearray(data)
    with mounted(pm, mnt):
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDWR)
        m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
        for p, off in ((0, 0), (2, 17), (9, PS - 4), (700, 1000)):  # zero and data pages
            blob = os.urandom(64)[: PS - off if off + 64 > PS else 64]
            m[p * PS + off:p * PS + off + len(blob)] = blob
            want[p * PS + off:p * PS + off + len(blob)] = blob
        m.flush()
        m.close()
        os.pwrite(fd, b"written with write(2)", 5 * PS + 3)  # a partial-page write
        want[5 * PS + 3:5 * PS + 3 + 21] = b"written with write(2)"
        os.close(fd)
        drop_caches()
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read() == bytes(want)
        assert read_stat(mnt, "writes") >= 1


@pytest.mark.expect_log("CHECKSUM MISMATCH", "GIVING UP", "failed less than 2 s ago",
                        "read failed: ", "prefetch: ")
def test_corrupt_volume_page_is_eio_and_neighbours_are_served(tmp_path, ram) -> None:
    path, data = ram
    vol, pm_path = str(tmp_path / "vol"), str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", vol, "--out", pm_path)
    region = PageMap.load(pm_path).region("ram0")
    bad = 100
    assert region.states[bad] == PageState.REMOTE
    with open(vol, "r+b") as f:
        f.seek(region.offsets[bad] + 7)
        f.write(b"corrupt!")
    mnt = str(tmp_path / "mnt")
    with mounted(pm_path, mnt, "--retries", "1"):
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDONLY)
        with pytest.raises(OSError) as e:
            os.pread(fd, PS, bad * PS)
        assert e.value.errno == 5  # EIO, never the wrong bytes, never zeros
        for p in (bad - 1, bad + 1, bad - 20, bad + 40):
            assert os.pread(fd, PS, p * PS) == data[p * PS:(p + 1) * PS]
        os.close(fd)
        assert read_stat(mnt, "checksum_failures") >= 2  # first try and the retry
        assert read_stat(mnt, "pages_failed") >= 1
        log = open(mnt + ".log").read()
        assert "CHECKSUM MISMATCH" in log and "GIVING UP" in log


@pytest.mark.expect_log("control command failed: load .*: a page map is already installed")
def test_io_waits_for_the_page_map(tmp_path, ram) -> None:
    path, data = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    mnt = str(tmp_path / "mnt")
    with mounted(None, mnt, "--region", f"ram0:{len(data)}"):
        assert os.path.getsize(os.path.join(mnt, "ram0")) == len(data)
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(
            open(os.path.join(mnt, "ram0"), "rb").read(8 * PS)))
        t.start()
        time.sleep(0.3)
        assert not got  # still waiting
        assert read_stat(mnt, "pagemap_installed") == 0
        res = memfs("load", mnt, pm)
        assert "installed" in res.stdout
        t.join(10)
        assert got == [data[:8 * PS]]
        assert read_stat(mnt, "reads_waited_for_pagemap") >= 1
        bad = memfs("load", mnt, pm, check=False)
        assert bad.returncode == 1 and "already installed" in bad.stderr


def test_daemon_mount_stats_and_umount(tmp_path, ram) -> None:
    path, data = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    res = memfs("mount", pm, mnt, "--log", str(tmp_path / "log"))
    try:
        assert "mounted" in res.stdout
        pid = int(open(os.path.join(mnt, ".memfs", "pid")).read())
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read() == data
        snap = json.loads(memfs("stats", "--json", mnt).stdout)
        assert snap["pages_total"] == len(data) // PS and snap["reads"] > 0
        table = memfs("stats", mnt).stdout
        assert "pages_remote" in table and "READ latency" in table
    finally:
        res = memfs("umount", mnt, check=False)
    assert res.returncode == 0, res.stderr
    assert not is_mounted(mnt)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # umount returned only after the daemon exited


@pytest.mark.parametrize("setup, message", [
    (lambda m: None, "does not exist"),
    (lambda m: open(m, "w").close(), "is not a directory"),
    (lambda m: (os.mkdir(m), open(os.path.join(m, "x"), "w").close()), "is not empty"),
])
def test_bad_mount_points_are_refused(tmp_path, ram, setup, message) -> None:
    path, _ = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    mnt = str(tmp_path / "mnt")
    setup(mnt)
    res = memfs("mount", pm, mnt, check=False)
    assert res.returncode == 1 and message in res.stderr


def test_corrupt_page_map_is_refused(tmp_path) -> None:
    pm = tmp_path / "pm"
    pm.write_bytes(b"\x85garbage")
    os.mkdir(tmp_path / "mnt")
    res = memfs("mount", str(pm), str(tmp_path / "mnt"), check=False)
    assert res.returncode == 1 and "not a msgpack page map" in res.stderr


def test_onward_capture_by_hand_reads_only_served_pages(tmp_path, ram) -> None:
    path, data = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt, "--no-prefetch", "--read-ahead-kb", "0"):
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDWR)
        os.pwrite(fd, b"new", 3 * PS)
        assert os.pread(fd, PS, 9 * PS) == data[9 * PS:10 * PS]
        os.close(fd)
        view = str(tmp_path / "view")
        assert "capture --view" in memfs("save", mnt, view).stdout
        res = memfs("capture", "--ram", os.path.join(mnt, "ram0"), "--view", view,
                    "--volume", str(tmp_path / "vol2"), "--out", str(tmp_path / "pm2"),
                    "--json")
        assert read_stat(mnt, "pages_remote") > 0  # the capture fetched nothing more
    out = json.loads(res.stdout)
    assert out["pages_read"] == 2, out
    onward = PageMap.load(tmp_path / "pm2").region("ram0")
    first = PageMap.load(pm).region("ram0")
    p = 100
    assert first.states[p] == PageState.REMOTE
    assert onward.offsets[p] == first.offsets[p]  # never read, still where it was
    assert PageMap.load(tmp_path / "pm2").disks[onward.disks[p]] == str(tmp_path / "vol")
