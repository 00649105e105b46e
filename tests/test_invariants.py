"""DESIGN.md's invariants, each raced deterministically: one test per
invariant that a race can break, named after it.

No sleeps: a gated fake disk and store (tests/fakes.py) hold a fetch or a
store write exactly where the test wants it, ``wait_all_tasks_blocked`` says
when every task has got there, and a ``Sequencer`` orders tasks that must
arrive one after the other.  Invariants 6 (locations never change), 7 (only
FUSEError leaves a handler), 8 (files checked whole) and 9 (the guest's
memory outlives the daemon) are not races between tasks of one daemon; they
are tested in test_capture, test_ops, test_faults_files and test_takeover.
"""

from __future__ import annotations

import errno
import logging
import threading

import pytest
import trio
import trio.testing

from fakes import PS, content, deferred_writes, setup
from memfs.pagemap import PageState
from memfs.pages import PageIOError, PageServer
from memfs.prefetch import Prefetcher

LOCAL, REMOTE = PageState.LOCAL, PageState.REMOTE


async def _read(server: PageServer, off: int, size: int, out: list[bytes]) -> None:
    out.append(await server.read("ram0", off, size))


async def test_invariant_1_a_read_racing_a_partial_write_is_whole_and_never_zeros(
        tmp_path) -> None:
    """A READ whose fetch is in flight when a partial WRITE of the same page
    arrives (the WRITE needs the page's old bytes: it joins the fetch)
    answers the whole page, captured or as written, never zeros; afterwards
    the page reads as written."""
    server, fetcher, disk, stats, _, pm = setup(tmp_path)
    out: list[bytes] = []
    written = bytearray(content(9))
    written[100:105] = b"hello"
    async with trio.open_nursery() as n:
        n.start_soon(_read, server, 9 * PS, PS, out)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(server.write, "ram0", 9 * PS + 100, b"hello")
        await trio.testing.wait_all_tasks_blocked()
        assert disk.reads == [(9 * PS, PS)] and out == []  # both wait for one fetch
        disk.open()
    assert out[0] in (content(9), bytes(written))
    assert await server.read("ram0", 9 * PS, PS) == bytes(written)
    # an unaligned READ across a zero page and fetched pages: full length
    got = await server.read("ram0", 100, 3 * PS - 200)
    assert got == (bytes(PS) + content(1) + content(2))[100:3 * PS - 100]
    assert stats.counters["pages_joined"] == 1


@pytest.mark.parametrize("racer", ["demand-read", "prefetch", "deferred-store-write"])
async def test_invariant_2_a_write_racing_a_fetch_is_never_overwritten(tmp_path, racer) -> None:
    """A WRITE lands while remote data for the same page is on its way: in a
    READ's fetch, in a prefetch batch, or fetched and waiting for its
    (deferred) store write.  The written bytes win, now and after."""
    server, fetcher, disk, stats, store, pm = setup(tmp_path)
    r = pm.region("ram0")
    mine = b"W" * PS
    out: list[bytes] = []
    async with deferred_writes(server), trio.open_nursery() as n:
        if racer == "demand-read":
            n.start_soon(_read, server, 12 * PS, 2 * PS, out)
        elif racer == "prefetch":
            n.start_soon(server.prefetch, r, [12, 13])
        else:  # the READ is answered; its store write waits at the gate
            store.gate = trio.Event()
            disk.open()
            out.append(await server.read("ram0", 12 * PS, 2 * PS))
        await trio.testing.wait_all_tasks_blocked()
        assert r.states[12] == REMOTE
        n.start_soon(server.write, "ram0", 12 * PS, mine)
        await trio.testing.wait_all_tasks_blocked()
        if racer != "deferred-store-write":  # no lock held: the WRITE is done
            assert r.states[12] == LOCAL
        disk.open()
        store.gate.set()
    assert out in ([], [content(12) + content(13)], [mine + content(13)])
    assert r.states[12] == r.states[13] == LOCAL
    assert await server.read("ram0", 12 * PS, 2 * PS) == mine + content(13)
    assert await store.read("ram0", 12 * PS, PS) == mine
    assert server.dirty.is_dirty("ram0", 12) and not server.dirty.is_dirty("ram0", 13)


class _Residency:
    """cachestat(2) stand-in: a page cache that gains what the kernel reads."""

    def __init__(self, path: str) -> None:
        self.held = 0

    def cached(self, offset: int, length: int) -> int:
        return self.held

    def close(self) -> None:
        pass


async def test_invariant_3_a_push_hands_the_kernel_no_bytes(tmp_path) -> None:
    """The prefetcher's push, held in its worker thread while READs of the
    same range (one joining the batch's fetch, one of a page inside the
    range) are answered.  A push carries no page content: it names a range
    of the region file and the kernel reads in only what it lacks, so no
    push can land on a page a READ served (DESIGN.md invariant 3, kept by
    the kernel's own page-cache lookup; the real mount is raced in
    test_prefetch)."""
    server, fetcher, disk, stats, _, pm = setup(tmp_path)
    asked: list[tuple[int, int]] = []
    inside, release = threading.Event(), threading.Event()

    def populate(res: _Residency, offset: int, length: int) -> int:
        asked.append((offset // PS, length // PS))
        inside.set()
        assert release.wait(30)
        res.held += 60
        return 60

    pf = Prefetcher(server, stats, mountpoint="/fake", residency=_Residency,
                    populate=populate)
    out: list[bytes] = []
    try:
        async with trio.open_nursery() as n:
            n.start_soon(pf.run)
            await disk.read_seen.wait()  # after the residency check (a thread)
            await trio.testing.wait_all_tasks_blocked()
            assert disk.reads == [(PS, 63 * PS)]               # the batch is on its way
            n.start_soon(_read, server, 10 * PS, 2 * PS, out)  # joins it
            await trio.testing.wait_all_tasks_blocked()
            disk.open()
            assert await trio.to_thread.run_sync(inside.wait, 30)
            await _read(server, 40 * PS, PS, out)  # a page inside the range being pushed
            release.set()
            await pf.done.wait()
    finally:
        release.set()
    assert out == [content(10) + content(11), content(40)]
    assert asked == [(1, 63)]  # one range, whole: which pages it lacks is the kernel's call
    assert stats.counters["pages_pushed"] == 60
    assert server.served.count() == 3  # the READs; the kernel's own reads would add the rest


async def test_invariant_4_io_before_the_page_map_waits_for_it(tmp_path) -> None:
    """A READ and a WRITE that arrive (in this order) before the page map
    wait for it, touch nothing, and proceed once it is installed."""
    server, fetcher, disk, stats, _, pm = setup(tmp_path, install=False)
    disk.open()
    seq = trio.testing.Sequencer()
    out: list[bytes] = []

    async def reader() -> None:
        async with seq(0):
            pass
        await _read(server, 0, 4 * PS, out)

    async def writer() -> None:
        async with seq(1):
            pass
        await server.write("ram0", 5 * PS, b"x" * PS)

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        async with seq(2):
            assert out == [] and disk.reads == []
            assert stats.counters["reads_waited_for_pagemap"] == 2
            server.install(pm, fetcher)
    assert out == [bytes(PS) + content(1) + content(2) + content(3)]
    assert await server.read("ram0", 5 * PS, PS) == b"x" * PS


async def test_invariant_5_a_fetch_that_fails_verification_is_retried_then_eio(
        tmp_path, caplog) -> None:
    """A disk answer that does not verify is retried, and a READ that joined
    the failing fetch gets the verified bytes too; only when every retry
    failed does the READ fail with EIO; both are counted and logged loudly."""
    server, fetcher, disk, stats, _, pm = setup(tmp_path, retries=3)
    r = pm.region("ram0")
    disk.corrupt_next = 1
    out: list[bytes] = []
    async with trio.open_nursery() as n:
        n.start_soon(_read, server, 9 * PS, PS, out)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(_read, server, 9 * PS, PS, out)
        await trio.testing.wait_all_tasks_blocked()
        disk.open()
    assert out == [content(9), content(9)]
    assert disk.reads == [(9 * PS, PS)] * 2
    c = stats.counters
    assert (c["checksum_failures"], c["fetch_retries"], c["pages_failed"]) == (1, 1, 0)
    assert r.states[9] == LOCAL
    disk.corrupt_next = 4  # the first try and every retry
    with pytest.raises(PageIOError) as e:
        await server.read("ram0", 20 * PS, PS)
    assert e.value.errno == errno.EIO
    assert str(e.value) == "region ram0: 1 page(s) failed, first 20: checksum mismatch"
    assert (c["checksum_failures"], c["pages_failed"], c["read_errors"]) == (5, 1, 1)
    assert r.states[20] == REMOTE
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert loud == ["CHECKSUM MISMATCH in region ram0 pages 9 (disk 0, attempt 1)"] + [
        f"CHECKSUM MISMATCH in region ram0 pages 20 (disk 0, attempt {a})"
        for a in range(1, 5)] + [
        "GIVING UP on region ram0 pages 20 after 4 attempt(s): checksum mismatch"]
