"""Single flight per page: a page is read from the disk once, whoever asks.

A gated fake disk (each read waits until the test opens its gate) and
trio.testing.wait_all_tasks_blocked make every interleaving deterministic:
demand READs, prefetch batches and deferred store writes meet at exactly the
moment the test chooses.  The real-mount side (the kernel's read-ahead, the
prefetcher, the demo) is in test_single_flight_mount below.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import trio
import trio.testing

from fakes import NPAGES, PS, GatedDisk, content, deferred_writes, make_map, setup
from memfs.fetcher import Fetcher, FetchError
from memfs.pagemap import PageMap, PageState
from memfs.pages import PageServer
from memfs.stats import Stats


async def test_two_demand_reads_of_a_page_read_the_disk_once(tmp_path) -> None:
    server, fetcher, disk, stats, _, _ = setup(tmp_path)
    out: list[bytes] = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _read(server, 5 * PS, PS, out))
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(lambda: _read(server, 5 * PS, 100, out))
        await trio.testing.wait_all_tasks_blocked()
        assert disk.reads == [(5 * PS, PS)]  # the second waits for the first
        assert fetcher.in_flight(server.pagemap.region("ram0")) == 1
        disk.open()
    assert sorted(out, key=len) == [content(5)[:100], content(5)]
    assert disk.reads == [(5 * PS, PS)]
    c = stats.counters
    assert (c["pages_fetched"], c["pages_fetched_demand"], c["pages_joined"]) == (1, 1, 1)


async def _read(server: PageServer, off: int, size: int, out: list[bytes]) -> None:
    out.append(await server.read("ram0", off, size))


async def test_a_read_waits_for_the_prefetch_that_has_its_page(tmp_path) -> None:
    server, fetcher, disk, stats, _, pm = setup(tmp_path)
    r = pm.region("ram0")
    out: list[bytes] = []

    async def prefetch() -> None:
        got = await fetcher.fetch(r, list(range(1, 33)), prefetch=True)
        await server.keep(r, got)

    async with trio.open_nursery() as n:
        n.start_soon(prefetch)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(lambda: _read(server, 10 * PS, 4 * PS, out))   # inside the batch
        n.start_soon(lambda: _read(server, 31 * PS, 3 * PS, out))   # straddles its end
        await trio.testing.wait_all_tasks_blocked()
        assert disk.reads == [(PS, 32 * PS), (33 * PS, 1 * PS)]
        disk.open()
    data = b"".join(content(p) for p in range(NPAGES))
    assert sorted(out) == sorted([data[10 * PS:14 * PS], data[31 * PS:34 * PS]])
    assert disk.reads == [(PS, 32 * PS), (33 * PS, PS)]
    c = stats.counters
    assert (c["pages_fetched"], c["pages_fetched_prefetch"], c["pages_fetched_demand"]) \
        == (33, 32, 1)
    assert c["pages_joined"] == 6
    assert r.states[1:34] == bytes([PageState.LOCAL]) * 33


async def test_a_page_fetched_but_not_yet_stored_is_answered_from_its_bytes(tmp_path) -> None:
    server, fetcher, disk, stats, store, pm = setup(tmp_path)
    disk.gated = False
    store.gate = trio.Event()  # the deferred store write does not land
    r = pm.region("ram0")
    out: list[bytes] = []
    async with deferred_writes(server), trio.open_nursery() as bg:
        assert await server.read("ram0", 7 * PS, PS) == content(7)
        await trio.testing.wait_all_tasks_blocked()
        assert r.states[7] == PageState.REMOTE  # not stored yet
        # the prefetcher and a READ take the fetched bytes, not the disk's
        got = await fetcher.fetch(r, [7], prefetch=True)
        assert bytes(got[7]) == content(7)
        bg.start_soon(lambda: _read(server, 6 * PS, 3 * PS, out))
        await trio.testing.wait_all_tasks_blocked()
        assert disk.reads[0] == (7 * PS, PS)  # then 6 and 8, side by side
        assert sorted(disk.reads) == [(6 * PS, PS), (7 * PS, PS), (8 * PS, PS)]
        assert stats.counters["pages_held_hits"] == 2
        # the READ that took page 7 from another fetch answers once it is
        # stored (as if it had fetched it itself): the store is still shut
        assert out == []
        store.gate.set()
    assert out == [content(6) + content(7) + content(8)]
    assert r.states[6:9] == bytes([PageState.LOCAL]) * 3
    assert fetcher._held["ram0"] == {}  # settled: the page state answers now
    assert await server.read("ram0", 7 * PS, PS) == content(7)
    assert len(disk.reads) == 3


async def test_a_demand_read_asks_again_when_the_prefetch_it_joined_fails(tmp_path) -> None:
    server, fetcher, disk, stats, _, pm = setup(tmp_path, retries=0)
    r = pm.region("ram0")
    disk.fail_next = 1
    errors: list[str] = []
    out: list[bytes] = []

    async def prefetch() -> None:
        try:
            await fetcher.fetch(r, [3, 4], prefetch=True)
        except FetchError as e:
            errors.append(str(e))

    async with trio.open_nursery() as n:
        n.start_soon(prefetch)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(lambda: _read(server, 4 * PS, PS, out))
        await trio.testing.wait_all_tasks_blocked()
        assert disk.reads == [(3 * PS, 2 * PS)]
        disk.open()
    assert errors == ["region ram0: 2 page(s) failed, first 3: "
                      "gated://test: read of 8192 bytes at 12288 failed"]
    assert out == [content(4)]
    assert disk.reads == [(3 * PS, 2 * PS), (4 * PS, PS)]
    assert stats.counters["pages_fetched_demand"] == 1


async def test_a_demand_read_shares_the_failure_of_the_demand_read_it_joined(tmp_path) -> None:
    server, fetcher, disk, stats, _, pm = setup(tmp_path, retries=0)
    disk.fail_next = 1
    errors: list[str] = []

    async def read(off: int) -> None:
        try:
            await server.read("ram0", off, PS)
        except Exception as e:  # PageIOError with the errno the kernel sees
            errors.append(f"{type(e).__name__} {getattr(e, 'errno', '')}: {e}")

    async with trio.open_nursery() as n:
        n.start_soon(read, 9 * PS)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(read, 9 * PS)
        await trio.testing.wait_all_tasks_blocked()
        disk.open()
    msg = ("PageIOError 5: region ram0: 1 page(s) failed, first 9: gated://test: read of "
           "4096 bytes at 36864 failed")
    assert errors == [msg, msg]
    assert disk.reads == [(9 * PS, PS)]  # one read, one deadline, two answers


async def test_a_cancelled_fetch_leaves_its_pages_to_those_that_waited(tmp_path) -> None:
    server, fetcher, disk, stats, _, pm = setup(tmp_path)
    r = pm.region("ram0")
    out: list[bytes] = []
    async with trio.open_nursery() as n:
        owner = trio.CancelScope()

        async def first() -> None:
            with owner:
                await fetcher.fetch(r, [12, 13], prefetch=True)
        n.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(lambda: _read(server, 12 * PS, 2 * PS, out))
        await trio.testing.wait_all_tasks_blocked()
        owner.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert fetcher.in_flight(r) == 2  # the waiter's own fetch now
        disk.open()
    assert out == [content(12) + content(13)]
    assert disk.reads == [(12 * PS, 2 * PS), (12 * PS, 2 * PS)]


async def test_counters_split_demand_prefetch_and_bridged_bytes(tmp_path) -> None:
    pm, data = make_map()
    r = pm.region("ram0")
    for p in (21, 22):  # a hole of two zero pages between remote pages
        r.set_zero(p)
    disk = GatedDisk(data, gated=False)
    stats = Stats()
    fetcher = Fetcher([disk], stats, max_gap=4 * PS)
    got = await fetcher.fetch(r, [20, 23, 24], prefetch=True)
    assert sorted(got) == [20, 23, 24] and bytes(got[23]) == content(23)
    await fetcher.fetch(r, [30])
    assert disk.reads == [(20 * PS, 5 * PS), (30 * PS, PS)]
    c = stats.counters
    assert (c["pages_fetched_prefetch"], c["pages_fetched_demand"], c["pages_fetched"]) \
        == (3, 1, 4)
    assert c["bytes_bridged"] == 2 * PS
    assert c["bytes_fetched"] - c["bytes_bridged"] == 4 * PS


# -- real mounts: the kernel's read-ahead and the prefetcher race the READs ----

def _random_reads(path: str, size: int, seed: int) -> bytes:
    """Every 4 KiB of ``path`` read once, in a random order (read(2), so the
    kernel's read-ahead runs as for a guest)."""
    import random
    order = list(range(size // PS))
    random.Random(seed).shuffle(order)
    out = bytearray(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        for p in order:
            out[p * PS:(p + 1) * PS] = os.pread(fd, PS, p * PS)
    finally:
        os.close(fd)
    return bytes(out)


@pytest.mark.mount
@pytest.mark.parametrize("extra", [("--no-prefetch",), ()],
                         ids=["demand-only", "demand-and-prefetch"])
@pytest.mark.usefixtures("needs_fuse")
def test_every_remote_page_is_fetched_once_through_a_mount(tmp_path, extra) -> None:
    from ramimage import make_ram, memfs, mounted, read_stat
    ram = str(tmp_path / "vm.ram")
    data = make_ram(ram, 4096)  # 16 MiB
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", ram, "--volume", str(tmp_path / "vol"), "--out", pm)
    remote = PageMap.load(pm).counts()["pages_remote"]
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt, *extra):
        assert _random_reads(os.path.join(mnt, "ram0"), len(data), seed=3) == data
        if "--no-prefetch" not in extra:
            t = time.monotonic() + 60
            while read_stat(mnt, "prefetch_done") != 1:
                assert time.monotonic() < t, "prefetch never finished"
                time.sleep(0.05)
        st = {k: read_stat(mnt, k) for k in (
            "pages_fetched", "pages_fetched_demand", "pages_fetched_prefetch",
            "bytes_fetched", "bytes_bridged", "pages_remote", "pages_joined")}
        with open(os.path.join(mnt, ".memfs", "stats.json")) as f:
            snap = json.load(f)
    # the gauges (counters moved by each state change) against the page map
    pmap = PageMap.load(pm).counts()
    assert snap["pages_total"] == pmap["pages_total"] == snap["pages_served"]
    assert snap["pages_zero"] == pmap["pages_zero"]
    assert snap["pages_local"] == pmap["pages_remote"]  # every remote page stored
    assert snap["pages_on_volume"] + snap["pages_on_disks"] == snap["pages_remote"] == 0
    print(f"remote pages {remote}: {st}")
    assert st["pages_remote"] == 0
    assert st["pages_fetched"] == remote  # every remote page touched, once
    assert st["pages_fetched_demand"] + st["pages_fetched_prefetch"] == remote
    assert st["bytes_fetched"] - st["bytes_bridged"] == remote * PS


async def test_a_prefetch_a_demand_read_waits_for_goes_at_demand_priority(tmp_path) -> None:
    """Prefetch reads wait while any demand read waits for a slot; once a
    demand READ joins a prefetch's flight, that flight must not wait behind
    the other demand reads any more (or the READ would)."""
    pm, data = make_map()
    r = pm.region("ram0")
    disk = GatedDisk(data)
    fetcher = Fetcher([disk], Stats(), slots=1, max_gap=0)
    got: dict[str, bytes] = {}

    async def fetch(tag: str, page: int, prefetch: bool) -> None:
        got[tag] = bytes((await fetcher.fetch(r, [page], prefetch=prefetch))[page])

    async with trio.open_nursery() as n:
        n.start_soon(fetch, "a", 1, False)   # holds the one slot
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(fetch, "b", 2, False)   # a demand read waiting for the slot
        n.start_soon(fetch, "p", 3, True)    # a prefetch: waits until no demand waits
        await trio.testing.wait_all_tasks_blocked()
        assert fetcher._slots.statistics().tasks_waiting == 1  # b only
        n.start_soon(fetch, "c", 3, False)   # a demand READ joins the prefetch
        await trio.testing.wait_all_tasks_blocked()
        assert fetcher._slots.statistics().tasks_waiting == 2  # b, then p
        assert disk.reads == [(PS, PS)]
        disk.open()
    assert disk.reads == [(PS, PS), (2 * PS, PS), (3 * PS, PS)]
    assert got == {"a": content(1), "b": content(2), "p": content(3), "c": content(3)}
