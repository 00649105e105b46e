"""Fetcher and page server without a kernel: coalescing, verification, the
invariants of DESIGN.md, on a real file disk."""

from __future__ import annotations

import errno
import os

import pytest
import trio
import trio.testing

from fakes import deferred_writes
from memfs.capture import capture
from memfs.disks import open_disk
from memfs.fetcher import Fetcher, coalesce
from memfs.pagemap import PageMap, PageState, Region
from memfs.pages import PageIOError, PageServer
from memfs.stats import Stats
from memfs.store import LocalStore
from ramimage import PS


def test_coalesce_joins_neighbours_on_disk_only() -> None:
    r = Region.empty("r", 16 * PS)
    for p in (1, 2, 3, 5, 6):
        r.set_remote(p, 0, p * PS, 0)
    r.set_remote(7, 0, 100 * PS, 0)   # neighbour in RAM, not on disk
    r.set_remote(8, 1, 8 * PS, 0)     # other disk
    runs = coalesce(r, [1, 2, 3, 5, 6, 7, 8], max_bytes=1 << 20)
    assert [(x.first, len(x.pages), x.disk, x.offset) for x in runs] == [
        (1, 3, 0, PS), (5, 2, 0, 5 * PS), (7, 1, 0, 100 * PS), (8, 1, 1, 8 * PS)]


def test_coalesce_respects_the_request_limit() -> None:
    r = Region.empty("r", 10 * PS)
    for p in range(10):
        r.set_remote(p, 0, p * PS, 0)
    assert [len(x.pages) for x in coalesce(r, range(10), max_bytes=4 * PS)] == [4, 4, 2]


async def captured(tmp_path, ram) -> tuple[PageMap, bytes, str]:
    path, data = ram
    vol = str(tmp_path / "vol")
    await capture([("ram0", path)], vol, str(tmp_path / "pm"), progress=False)
    return PageMap.load(tmp_path / "pm"), data, vol


async def make_server(tmp_path, pm: PageMap, *, install: bool = True):
    stats = Stats()
    disks = [await open_disk(u) for u in pm.disks]
    server = PageServer({r.name: r.size for r in pm.regions},
                        LocalStore(str(tmp_path / "store")), stats)
    fetcher = Fetcher(disks, stats, retry_delay=0.001)
    if install:
        server.install(pm, fetcher)
    return server, fetcher, stats


async def test_fetch_verifies_and_returns_runs(tmp_path, ram) -> None:
    pm, data, _ = await captured(tmp_path, ram)
    _, fetcher, stats = await make_server(tmp_path, pm)
    r = pm.region("ram0")
    pages = [p for p in range(64) if r.states[p] == PageState.REMOTE]
    got = await fetcher.fetch(r, pages)
    assert sorted(got) == pages
    assert all(got[p] == data[p * PS:(p + 1) * PS] for p in pages)
    assert stats.counters["pages_fetched"] == len(pages)
    assert stats.counters["fetch_requests"] < len(pages)  # coalesced


async def test_read_every_page_equals_capture(tmp_path, ram) -> None:
    pm, data, _ = await captured(tmp_path, ram)
    server, _, stats = await make_server(tmp_path, pm)
    for off, size in ((0, len(data)), (5000, 3 * PS + 7), (len(data) - 10, 100)):
        assert await server.read("ram0", off, size) == data[off:off + size]
    assert pm.counts()["pages_remote"] == 0  # everything now in the local store
    assert stats.counters["bytes_read"] > 0


async def test_corrupt_page_fails_alone_and_is_counted(tmp_path, ram) -> None:
    pm, data, vol = await captured(tmp_path, ram)
    r = pm.region("ram0")
    bad = 10
    assert r.states[bad] == PageState.REMOTE
    with open(vol, "r+b") as f:
        f.seek(r.offsets[bad] + 100)
        f.write(b"\xff\xfe")
    server, _, stats = await make_server(tmp_path, pm)
    with pytest.raises(PageIOError) as e:
        await server.read("ram0", 8 * PS, 4 * PS)
    assert e.value.errno == errno.EIO
    assert stats.counters["checksum_failures"] == 4  # first try + 3 retries
    assert stats.counters["pages_failed"] == 1
    # its neighbours are still served, and the bad page never is
    assert await server.read("ram0", 9 * PS, PS) == data[9 * PS:10 * PS]
    assert await server.read("ram0", 11 * PS, PS) == data[11 * PS:12 * PS]
    assert r.states[bad] == PageState.REMOTE


async def test_writes_win_over_remote_data(tmp_path, ram) -> None:
    pm, data, _ = await captured(tmp_path, ram)
    server, _, _ = await make_server(tmp_path, pm)
    r = pm.region("ram0")
    # a partial write into a remote page keeps the rest of the page
    p = next(p for p in range(100) if r.states[p] == PageState.REMOTE)
    await server.write("ram0", p * PS + 100, b"hello")
    want = bytearray(data[p * PS:(p + 1) * PS])
    want[100:105] = b"hello"
    assert await server.read("ram0", p * PS, PS) == bytes(want)
    # a partial write into a zero page
    z = next(p for p in range(100) if r.states[p] == PageState.ZERO)
    await server.write("ram0", z * PS + PS - 2, b"xy")
    assert await server.read("ram0", z * PS, PS) == bytes(PS - 2) + b"xy"
    # a write spanning pages, then a later fetch of the range does not undo it
    await server.write("ram0", 40 * PS - 3, b"A" * (2 * PS + 6))
    got = await server.read("ram0", 40 * PS - 3, 2 * PS + 6)
    assert got == b"A" * (2 * PS + 6)
    assert r.states[40] == PageState.LOCAL


async def test_write_beyond_end_is_refused(tmp_path, ram) -> None:
    pm, data, _ = await captured(tmp_path, ram)
    server, _, _ = await make_server(tmp_path, pm)
    with pytest.raises(PageIOError) as e:
        await server.write("ram0", len(data) - 1, b"ab")
    assert e.value.errno == errno.ENOSPC


async def test_dead_disk_gives_eio_not_zeros(tmp_path, ram) -> None:
    pm, data, vol = await captured(tmp_path, ram)
    os.truncate(vol, PS)  # the volume lost its data
    server, _, stats = await make_server(tmp_path, pm)
    with pytest.raises(PageIOError):
        await server.read("ram0", 0, len(data))
    assert stats.counters["fetch_errors"] >= 1 and stats.counters["read_errors"] == 1


def test_coalesce_bridges_small_gaps_on_disk() -> None:
    r = Region.empty("r", 16 * PS)
    for p in (0, 1, 3, 9):  # 2 is a zero page: a hole in the volume
        r.set_remote(p, 0, p * PS, 0)
    runs = coalesce(r, [0, 1, 3, 9], max_bytes=1 << 20, max_gap=2 * PS)
    assert [(x.offset, x.length, x.pages) for x in runs] == [
        (0, 4 * PS, ((0, 0), (1, PS), (3, 3 * PS))), (9 * PS, PS, ((9, 0),))]


def test_nowait_pread_serves_cached_bytes_and_declines_the_rest(tmp_path) -> None:
    from memfs.fileio import _NOWAIT_MAX, nowait_pread
    path = tmp_path / "f"
    data = os.urandom(3 * PS)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(3):  # evicted between the two calls: a rare miss, read again
            os.pread(fd, len(data), 0)  # now in the page cache
            got = nowait_pread(fd, PS, PS)
            if got is not None:
                break
        assert got == data[PS:2 * PS]
        assert nowait_pread(fd, 2 * PS, 2 * PS) is None  # past the end: a short read
        assert nowait_pread(fd, 0, _NOWAIT_MAX + PS) is None  # large: a thread's job
    finally:
        os.close(fd)


async def test_a_demand_fault_costs_at_most_one_thread_hop(tmp_path, ram, monkeypatch) -> None:
    """A 4 KiB fault of a remote page: the disk read is the one hop (none
    when the volume's page cache answers); the store write of the fetched
    page runs on the loop, deferred past the reply."""
    pm, data, vol = await captured(tmp_path, ram)
    server, _, stats = await make_server(tmp_path, pm)
    r = pm.region("ram0")
    remote = [p for p in range(r.npages) if r.states[p] == PageState.REMOTE]
    hops: list[str] = []
    real = trio.to_thread.run_sync

    async def counted(fn, *args, **kw):
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kw)
    monkeypatch.setattr(trio.to_thread, "run_sync", counted)

    def evict() -> None:
        fd = os.open(vol, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    async with deferred_writes(server):
        per_fault = []
        for p in remote[10:40:3]:
            evict()
            hops.clear()
            assert await server.read("ram0", p * PS, PS) == data[p * PS:(p + 1) * PS]
            await trio.testing.wait_all_tasks_blocked()  # the deferred store write too
            per_fault.append(len(hops))
            assert r.states[p] == PageState.LOCAL
        assert max(per_fault) <= 1, per_fault
        cached = []
        with open(vol, "rb") as f:
            f.read()  # the volume in the page cache
        for p in remote[50:80:3]:
            hops.clear()
            assert await server.read("ram0", p * PS, PS) == data[p * PS:(p + 1) * PS]
            await trio.testing.wait_all_tasks_blocked()
            cached.append(len(hops))
        assert cached == [0] * len(cached)
    print(f"hops per cold fault {per_fault}, per fault with the volume cached {cached}")
