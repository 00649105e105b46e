"""Nothing the guest wrote is discarded: a region cannot be truncated, a
store is never truncated or taken over by another mount, and a full store
refuses writes (ENOSPC, the page as it was) while reads still work."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import time
from pathlib import Path

import pytest

from ramimage import PS, drop_caches, memfs, mounted, read_stat, small_tmpfs

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("needs_fuse")]


def capture(tmp_path: Path, ram: str) -> str:
    pm = str(tmp_path / "vm.pagemap")
    memfs("capture", "--ram", ram, "--volume", str(tmp_path / "vol"), "--out", pm,
          "--no-progress")
    return pm


@pytest.mark.expect_log(r"refused open\(O_TRUNC\) of region ram0", "refused to resize inode")
def test_region_cannot_be_truncated_and_nothing_is_dropped(tmp_path, ram) -> None:
    """Dirty pages written through a shared mapping survive open(O_TRUNC),
    a shell redirect, cp, truncate(2) and ftruncate(2): each is EPERM."""
    path, data = ram
    pm = capture(tmp_path, path)
    mnt = str(tmp_path / "mnt")
    region = os.path.join(mnt, "ram0")
    want = bytearray(data)
    with mounted(pm, mnt, "--no-prefetch"):
        fd = os.open(region, os.O_RDWR)
        m = mmap.mmap(fd, len(data), mmap.MAP_SHARED)
        for p in (0, 1, 2, 100, 500, 1023):  # dirty, not synced
            blob = os.urandom(PS)
            m[p * PS:(p + 1) * PS] = blob
            want[p * PS:(p + 1) * PS] = blob
        t0 = time.monotonic()
        with pytest.raises(PermissionError) as e:
            os.open(region, os.O_WRONLY | os.O_TRUNC)
        took = time.monotonic() - t0
        assert e.value.errno == errno.EPERM
        for argv, msg in (
                (["sh", "-c", f": > {region}"], "Operation not permitted"),
                (["cp", path, region], f"cp: cannot create regular file '{region}': "
                                       "Operation not permitted"),
                (["truncate", "-s", "0", region], f"truncate: failed to truncate '{region}' "
                                                  "at 0 bytes: Operation not permitted")):
            res = subprocess.run(argv, capture_output=True, text=True)
            assert res.returncode != 0 and msg in res.stderr, (argv, res.stderr)
        with pytest.raises(PermissionError):
            os.truncate(region, 0)
        for size in (0, PS, len(data) + PS):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        assert os.fstat(fd).st_size == len(data)
        assert m[:] == bytes(want)  # the mapping still holds the dirty pages
        m.flush()
        m.close()
        os.close(fd)
        drop_caches()  # ... and they reached the daemon
        with open(region, "rb") as f:
            assert f.read() == bytes(want)
    print(f"\nopen(O_TRUNC) refused with EPERM in {took * 1000:.1f} ms")


@pytest.mark.expect_log("fetched pages not kept: .*No space left on device",
                        "write failed: local store write failed: .*No space left on device")
def test_full_store_fails_writes_with_enospc_and_reads_go_on(tmp_path, ram) -> None:
    path, data = ram
    pm = capture(tmp_path, path)
    mnt = str(tmp_path / "mnt")
    region = os.path.join(mnt, "ram0")
    with small_tmpfs(tmp_path / "store", "1m") as store:
        with mounted(pm, mnt, "--no-prefetch", "--store", str(store)):
            fd = os.open(region, os.O_RDWR)
            os.pwrite(fd, b"A" * PS, 8 * PS)  # a page the store keeps
            # fill the store's file system to the last block
            with open(store / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\xff" * PS)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
            before = os.pread(fd, 16 * PS, 0)
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"B" * 16 * PS, 0)  # over page 8 too
            took = time.monotonic() - t0
            assert e.value.errno == errno.ENOSPC
            assert str(e.value) == "[Errno 28] No space left on device"
            drop_caches()
            assert os.pread(fd, 16 * PS, 0) == before  # nothing of it was kept
            assert before[8 * PS:9 * PS] == b"A" * PS
            # reads of remote pages go on: verified, served without being kept
            want = bytearray(data)
            want[8 * PS:9 * PS] = b"A" * PS
            assert os.pread(fd, len(data), 0) == bytes(want)
            assert read_stat(mnt, "store_write_errors") > 0
            assert read_stat(mnt, "read_errors") == 0
            # room again: writes are kept again
            os.unlink(store / "filler")
            os.pwrite(fd, b"C" * PS, 3 * PS)
            drop_caches()
            assert os.pread(fd, PS, 3 * PS) == b"C" * PS
            os.close(fd)
        log = Path(mnt + ".log").read_text()
        assert "BUG" not in log
    print(f"\nWRITE on a full store: ENOSPC in {took * 1000:.1f} ms")


@pytest.mark.expect_log("stopped: local store .* holds the pages of another mount")
def test_remount_never_truncates_the_store(tmp_path, ram) -> None:
    """The same --store again: refused with one line, on stderr and in the
    daemon's log, the pages the guest wrote still there."""
    path, data = ram
    pm = capture(tmp_path, path)
    mnt, store = str(tmp_path / "mnt"), tmp_path / "store"
    with mounted(pm, mnt, "--store", str(store)):
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDWR)
        os.pwrite(fd, b"the guest wrote this", 40 * PS)
        os.fsync(fd)
        os.close(fd)
    pages = store / "ram0.pages"
    kept = pages.read_bytes()
    assert kept[40 * PS:40 * PS + 20] == b"the guest wrote this"
    res = memfs("mount", "-f", "--log", str(tmp_path / "again.log"), pm, mnt,
                "--store", str(store), check=False)
    assert res.returncode == 1
    why = (f"local store {pages} holds the pages of another mount; continue that mount "
           "with --resume STATE, or remove the file")
    assert res.stderr.strip() == f"memfs: {why}"
    assert (tmp_path / "again.log").read_text().rstrip().endswith(
        f" memfs.daemon CRITICAL: stopped: {why}")
    assert pages.read_bytes() == kept
    assert not os.path.ismount(mnt)


def test_a_temporary_store_has_no_name(tmp_path, ram) -> None:
    """Without --store the region's page file has no name (O_TMPFILE in
    /var/tmp): a guest write is kept and read back after the page cache is
    dropped, and nothing is left to pile up when a daemon is killed (named
    temporary stores did: 4 MiB from each run of this suite, a region's
    size from an operator's kill -9)."""
    path, _ = ram
    pm = capture(tmp_path, path)
    mnt = str(tmp_path / "mnt")
    before = set(os.listdir("/var/tmp"))
    with mounted(pm, mnt):
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDWR)
        os.pwrite(fd, b"kept in a file with no name", 9 * PS + 3)
        os.fsync(fd)
        drop_caches()
        assert os.pread(fd, 27, 9 * PS + 3) == b"kept in a file with no name"
        os.close(fd)
        pid = read_stat(mnt, "pid")
        links = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        stores = [ln for ln in links if ln.startswith("/var/tmp/")]
        assert stores and all(ln.endswith(" (deleted)") for ln in stores), links
        assert not [n for n in set(os.listdir("/var/tmp")) - before
                    if n.startswith("memfs-store-")]


def test_an_unnamed_store_file_where_o_tmpfile_is_refused(tmp_path, monkeypatch) -> None:
    """A file system without O_TMPFILE: the file is created and unlinked at
    once, in a directory of its own that is gone too."""
    from memfs.store import _unnamed_file
    # open(dir, O_RDWR | O_DIRECTORY) fails with EISDIR, as O_TMPFILE does there
    monkeypatch.setattr(os, "O_TMPFILE", os.O_DIRECTORY)
    fd = _unnamed_file(str(tmp_path), "ram0")
    try:
        assert os.fstat(fd).st_nlink == 0 and os.listdir(tmp_path) == []
        os.pwrite(fd, b"page bytes", 4096)
        assert os.pread(fd, 10, 4096) == b"page bytes"
    finally:
        os.close(fd)
