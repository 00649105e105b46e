"""Background completion and working-set traces: pure logic and real mounts."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

import pytest
import trio

from memfs.capture import capture
from memfs.pagemap import PageMap, PageState, Region
from memfs.prefetch import Prefetcher
from memfs.trace import Trace, TraceError
from ramimage import PS, drop_caches, make_ram, memfs, mounted, read_stat
from test_fetcher import make_server


def wait_stat(mnt: str, name: str, value: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while read_stat(mnt, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.05)


def test_trace_round_trip_and_errors(tmp_path) -> None:
    t = Trace()
    t.record("ram0", 100, [5, 3, 5, 99])
    t.record("ram0", 100, [3, 7])
    assert list(t.order["ram0"]) == [5, 3, 99, 7] and len(t) == 4
    t.save(str(tmp_path / "t"))
    assert list(Trace.load(str(tmp_path / "t")).order["ram0"]) == [5, 3, 99, 7]
    for bad in (b"", b"\x93\x01", Trace().dumps()[:-1]):
        with pytest.raises(TraceError):
            Trace.loads(bad)


def test_batches_take_the_trace_first() -> None:
    r = Region.empty("ram0", 64 * PS)
    for p in range(64):
        r.set_remote(p, 0, p * PS, 0)
    t = Trace()
    t.record("ram0", 64, [40, 41, 7])
    pf = Prefetcher.__new__(Prefetcher)
    pf.batch, pf.trace = 16 * PS, t
    batches = list(pf._batches(r))
    assert batches[0] == [7, 40, 41]
    assert sorted(p for b in batches[1:] for p in b) == list(range(64))  # the rest follows


async def test_prefetch_completes_into_the_store(tmp_path, ram) -> None:
    path, data = ram
    await capture([("ram0", path)], str(tmp_path / "vol"), str(tmp_path / "pm"),
                  progress=False)
    pm = PageMap.load(tmp_path / "pm")
    server, _, stats = await make_server(tmp_path, pm)
    pf = Prefetcher(server, stats, mountpoint=None)
    await pf.run()
    assert pm.counts()["pages_remote"] == 0 and pf.done.is_set()
    assert stats.counters["pages_prefetched"] == pm.counts()["pages_local"]
    os.truncate(tmp_path / "vol", 0)  # the disk is no longer needed
    assert await server.read("ram0", 0, len(data)) == data


class _NoResidency:
    def close(self) -> None:
        pass


async def test_write_racing_a_push_read_is_answered_with_the_written_bytes(tmp_path,
                                                                           ram) -> None:
    """A push's READs are answered from the batch's fetched bytes; a WRITE
    that lands on one of those pages while the push runs must win: the READ
    after it returns the written bytes, never the held fetched ones."""
    path, data = ram
    await capture([("ram0", path)], str(tmp_path / "vol"), str(tmp_path / "pm"),
                  progress=False)
    pm = PageMap.load(tmp_path / "pm")
    server, _, stats = await make_server(tmp_path, pm)
    seen: list[tuple[int, bytes, bytes]] = []

    def populate(res: object, offset: int, length: int) -> int:
        """The kernel's part, in the push's thread: the guest writes the
        first page whole and two bytes of the last one, then READs come."""
        last = offset + length - PS
        trio.from_thread.run(server.write, "ram0", offset, b"W" * PS)
        trio.from_thread.run(server.write, "ram0", last + 100, b"xy")
        got = trio.from_thread.run(server.read, "ram0", offset, length)
        want = bytearray(data[offset:offset + length])
        want[:PS] = b"W" * PS
        want[length - PS + 100:length - PS + 102] = b"xy"
        seen.append((offset, bytes(got), bytes(want)))
        return 0

    pf = Prefetcher(server, stats, mountpoint=str(tmp_path), batch=64 * PS,
                    residency=lambda _: _NoResidency(), populate=populate)  # type: ignore
    await pf.run()
    assert seen and pm.counts()["pages_remote"] == 0
    for offset, got, want in seen:
        assert got == want, f"push READ at {offset} did not return the written bytes"
    # the pages between were answered from the held bytes, and none stays held
    assert stats.counters["pages_push_held_hits"] > 0
    assert server.held.held("ram0") == {}
    for offset, _, want in seen:
        assert await server.read("ram0", offset, len(want)) == want


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_pushed_pages_are_page_cache_hits(tmp_path, ram) -> None:
    path, data = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt):
        wait_stat(mnt, "prefetch_done", 1)
        assert read_stat(mnt, "pages_remote") == 0
        assert read_stat(mnt, "pages_pushed") > 0
        reads = read_stat(mnt, "reads")
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            assert m[:] == data
            m.close()
        # pushed pages and the zero pages between them never cost a READ
        assert read_stat(mnt, "reads") - reads < len(data) // PS // 8


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_prefetch_never_overwrites_what_the_guest_wrote(tmp_path, ram) -> None:
    path, data = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    mnt = str(tmp_path / "mnt")
    want = bytearray(data)
    with mounted(pm, mnt, "--prefetch-rate", "1M"):  # slow: we write ahead of it
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDWR)
        m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
        for p in range(1, len(data) // PS, 37):
            m[p * PS + 8:p * PS + 16] = b"GUESTWR!"
            want[p * PS + 8:p * PS + 16] = b"GUESTWR!"
        mid = bytes(m[:])  # the dirty pages as the guest sees them
        assert mid == bytes(want)
        m.flush()
        wait_stat(mnt, "prefetch_done", 1, timeout=60)
        assert bytes(m[:]) == bytes(want)
        m.close()
        os.close(fd)
        drop_caches()
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read() == bytes(want)


_WRITER = """
import mmap, os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
pages = list(range(len(m) // 4096))
random.Random(7).shuffle(pages)
for p in pages:
    m[p * 4096 + 8:p * 4096 + 16] = b"W%07d" % p
m.flush()
"""


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_guest_writes_racing_pushes_at_full_speed_are_kept(tmp_path) -> None:
    """A writer (a child process: a mapped page must not be touched with the
    GIL held) stamps every page in random order while background completion
    pushes at full speed, so the kernel's READs and the pushes meet on the
    same ranges.  Every stamp survives completion and a dropped page cache
    (invariant 3: a push never lands on a page the guest wrote)."""
    path = str(tmp_path / "vm.ram")
    data = make_ram(path, 8192)
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    want = bytearray(data)
    for p in range(len(data) // PS):
        want[p * PS + 8:p * PS + 16] = b"W%07d" % p
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt):
        subprocess.run([sys.executable, "-c", _WRITER, os.path.join(mnt, "ram0")],
                       check=True, timeout=120)
        wait_stat(mnt, "prefetch_done", 1, timeout=120)
        assert read_stat(mnt, "pages_pushed") > 0
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read() == bytes(want)
        drop_caches()
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read() == bytes(want)


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_trace_is_written_at_unmount_and_replayed(tmp_path, ram) -> None:
    path, data = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    region = PageMap.load(pm).region("ram0")
    touched = [p for p in (900, 12, 500, 77) if region.states[p] == PageState.REMOTE]
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt, "--no-prefetch", "--read-ahead-kb", "0"):
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDONLY)
        for p in touched:
            assert os.pread(fd, PS, p * PS) == data[p * PS:(p + 1) * PS]
        os.close(fd)
    trace = Trace.load(pm + ".trace")
    assert list(trace.order["ram0"])[:len(touched)] == touched
    with mounted(pm, mnt, "--prefetch-trace", pm + ".trace", "--no-push"):
        wait_stat(mnt, "prefetch_done", 1)
        log = open(mnt + ".log").read()
        assert "every page is local" in log
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"nonsense")
    res = memfs("mount", pm, mnt, "--prefetch-trace", str(bad), check=False)
    assert res.returncode == 1 and "not a trace" in res.stderr


async def test_hot_pages_from_capture_go_first(tmp_path, ram) -> None:
    path, _ = ram
    vol, pm1, pm2 = str(tmp_path / "vol"), str(tmp_path / "pm1"), str(tmp_path / "pm2")
    await capture([("ram0", path)], vol, pm1, progress=False)
    with open(path, "r+b") as f:
        for p in (601, 2, 900):
            f.seek(p * PS)
            f.write(b"busy")
    await capture([("ram0", path)], vol, pm2, base=pm1, progress=False)
    pm = PageMap.load(pm2)
    t = Trace()
    t.record("ram0", 1024, [900])  # an earlier mount's trace comes before hot pages
    assert t.extend_from_meta(pm.meta) == 2
    assert list(t.order["ram0"]) == [900, 2, 601]
    loaded = Trace.loads(t.dumps())
    loaded.record("ram0", 1024, [5, 2])  # a loaded trace keeps its order
    assert list(loaded.order["ram0"]) == [900, 2, 601, 5]


def test_a_push_reads_its_whole_range_in_one_call() -> None:
    """read_through's iovecs cover the range (up to the cap) with the
    thread's one scratch buffer: one system call per batch, no buffer per
    batch."""
    from memfs import prefetch
    mib = prefetch._SCRATCH
    for length, want in ((PS, [PS]), (mib, [mib]), (5 * mib + 3 * PS, [mib] * 5 + [3 * PS]),
                         (prefetch.IOV_MAX * mib + PS, [mib] * prefetch.IOV_MAX)):
        iov = prefetch._iovecs(length)
        assert [len(v) for v in iov] == want
        assert all(v.obj is iov[0].obj for v in iov)
