"""The sequential READ path's compiled helpers (memfs._fast) and the file
disk's read-ahead for 1 MiB READs (memfs.disks.direct).

Buffer: O_DIRECT read buffers that go back to a pool when their last view
is gone; verify: a run's pages against their xxh3 in one call (the page
map's checksum is xxhash's xxh3_64); span: a READ answered with the disk's
buffer itself.  Real files on a real disk (/var/tmp: O_DIRECT works there).
"""

from __future__ import annotations

import gc
import os
import random
from array import array

import pytest
import trio
import trio.testing
import xxhash

from memfs import _fast
from memfs._fast import AIO, Buffer, has_xxh3, pool, span, verify
from memfs.disks import parse_uri
from memfs.disks import direct
from memfs.disks.file import FileDisk

PS = 4096
MIB = 1 << 20


@pytest.fixture
def big_file() -> tuple[str, bytes]:
    data = random.Random(11).randbytes(32 * MIB)
    d = "/var/tmp" if os.path.isdir("/var/tmp") else "/tmp"
    path = os.path.join(d, f"memfs-direct-ra-{os.getpid()}.img")
    with open(path, "wb") as f:
        f.write(data)
    yield path, data
    os.unlink(path)


def test_a_buffer_is_writable_memory_of_its_length_and_its_memory_is_reused() -> None:
    pool(0)
    pool(direct.POOL_BYTES)
    _, _, made0, reused0 = pool()
    b = Buffer(MIB + 5)
    assert len(b) == MIB + 5
    v = memoryview(b)
    assert len(v) == MIB + 5 and not v.readonly
    v[-5:] = b"hello"
    assert bytes(v[-5:]) == b"hello"
    del v
    assert pool()[:2] == (0, 0)  # still alive: b holds it
    del b
    gc.collect()
    assert pool()[:2] == (1, 2 * MIB)  # whole MiB: 2 MiB back in the pool
    c = Buffer(2 * MIB)  # the same size class: taken from the pool
    assert pool() == (0, 0, made0 + 1, reused0 + 1)
    view = memoryview(c)[:10]
    del c  # a view keeps the memory: nothing goes back yet
    assert pool()[:2] == (0, 0)
    del view
    assert pool()[:2] == (1, 2 * MIB)
    pool(0)  # trimmed: unmapped
    assert pool()[:2] == (0, 0)
    pool(direct.POOL_BYTES)
    for bad in (0, -1, (1 << 32) + 1):
        with pytest.raises(ValueError) as e:
            Buffer(bad)
        assert str(e.value) == "length must be 1 byte .. 4 GiB"


def test_a_buffer_takes_an_o_direct_read(big_file) -> None:
    path, data = big_file
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    aio = AIO(4)
    try:
        b = Buffer(3 * MIB)
        aio.submit(fd, b, MIB, "k")
        got: list = []
        while not got:
            got = aio.reap(False)  # polled: the eventfd is left set
        assert got == [("k", 3 * MIB)]
        assert bytes(memoryview(b)) == data[MIB:4 * MIB]
        assert os.read(aio.fd, 8)  # still readable: reap(False) did not clear it
    finally:
        aio.close()
        os.close(fd)


def test_a_read_the_kernel_refuses_at_submit_completes_with_its_errno(big_file) -> None:
    """io_submit runs in the module's own thread: a refusal (here a
    descriptor that is not open) comes back from reap like any completion,
    and the reads queued behind it still run."""
    path, data = big_file
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    aio = AIO(8)
    bad = os.open(path, os.O_RDONLY)
    os.close(bad)  # a closed descriptor (after AIO's eventfd is open): EBADF at submit
    try:
        bufs = [Buffer(MIB) for _ in range(3)]
        aio.submit(fd, bufs[0], 0, "first")
        aio.submit(bad, bufs[1], 0, "closed")
        aio.submit(fd, bufs[2], 2 * MIB, "third")
        assert aio.inflight == 3
        done: list = []
        while len(done) < 3:
            done += aio.reap()
        assert sorted(done) == [("closed", -9), ("first", MIB), ("third", MIB)]
        assert aio.inflight == 0
        assert bytes(memoryview(bufs[2])) == data[2 * MIB:3 * MIB]
    finally:
        aio.close()
        os.close(fd)


def _pages(n: int, seed: int) -> tuple[bytes, array]:
    data = random.Random(seed).randbytes(n * PS)
    sums = array("Q", (xxhash.xxh3_64_intdigest(data[i * PS:(i + 1) * PS]) for i in range(n)))
    return data, sums


@pytest.mark.skipif(not has_xxh3(), reason="no libxxhash.so.0 on this host")
def test_verify_matches_xxhash_and_names_the_pages_that_do_not() -> None:
    data, sums = _pages(40, 1)
    # a run that bridged a gap: pages 10..14 at their places, page 20 after 3 pages of gap
    pages = tuple((10 + i, i * PS) for i in range(5)) + ((20, 8 * PS),)
    run = bytearray(data[10 * PS:15 * PS] + bytes(3 * PS) + data[20 * PS:21 * PS])
    run[2 * PS + 7] ^= 1  # page 12 is damaged
    sums[14] ^= 1 << 63  # page 14's checksum does not match its bytes
    good: dict = {}
    bad = verify(memoryview(run), PS, sums, pages, good)
    assert bad == [12, 14]
    assert sorted(good) == [10, 11, 13, 20]
    for p in good:
        assert bytes(good[p]) == data[p * PS:(p + 1) * PS]
        assert good[p].obj is run  # views of the run, not copies
    # the empty run, and every page of a clean one
    assert verify(memoryview(b""), PS, sums, (), {}) == []
    good = {}
    assert verify(memoryview(data), PS, sums, tuple((p, p * PS) for p in range(40)), good) \
        == [14]
    assert len(good) == 39


@pytest.mark.skipif(not has_xxh3(), reason="no libxxhash.so.0 on this host")
def test_verify_refuses_what_does_not_fit() -> None:
    data, sums = _pages(4, 2)
    with pytest.raises(ValueError) as e:
        verify(memoryview(data), PS, sums, ((4, 0),), {})
    assert str(e.value) == "page 4 at 0 does not fit"
    with pytest.raises(ValueError) as e:
        verify(memoryview(data), PS, sums, ((1, 3 * PS + 1),), {})
    assert str(e.value) == f"page 1 at {3 * PS + 1} does not fit"
    with pytest.raises(ValueError) as e:
        verify(memoryview(data), PS, array("I", [0]), ((0, 0),), {})
    assert str(e.value) == "sums must hold 8-byte checksums"
    with pytest.raises(TypeError):
        verify(data, PS, sums, ((0, 0),), {})  # bytes: views need a memoryview


def test_span_is_one_view_of_pages_in_order_in_one_buffer() -> None:
    data = bytearray(random.Random(4).randbytes(8 * PS))
    view = memoryview(data)
    pages = {p: view[p * PS:(p + 1) * PS] for p in range(8)}
    whole = span(pages, 2, 5, PS)
    assert whole is not None and whole.obj is data
    assert bytes(whole) == bytes(data[2 * PS:7 * PS])
    assert span(pages, 0, 9, PS) is None  # page 8 is not there
    other = dict(pages)
    other[3] = memoryview(bytes(data[3 * PS:4 * PS]))  # same bytes, another buffer
    assert span(other, 2, 3, PS) is None
    assert bytes(span(other, 4, 4, PS)) == bytes(data[4 * PS:8 * PS])
    swapped = dict(pages)
    swapped[4], swapped[5] = pages[5], pages[4]
    assert span(swapped, 3, 3, PS) is None  # out of order
    assert span({0: b"x" * PS}, 0, 1, PS) is None  # not a view
    assert span(pages, 0, 0, PS) is None


async def test_one_mib_reads_in_order_are_read_ahead_after_a_streak(big_file) -> None:
    """A sequential first touch (1 MiB READs in order) gets windows read
    ahead once 4 MiB were read in order; a huge-page fault's four READs,
    then a jump elsewhere, get none; every byte is the file's."""
    path, data = big_file
    d = await FileDisk.open(parse_uri(path))
    assert d._direct is not None
    for start in (0, 20 * MIB, 8 * MIB, 26 * MIB):  # touches 4 MiB each, not in order
        for k in range(4):
            off = start + k * MIB
            assert bytes(await d.read(off, MIB)) == data[off:off + MIB]
    assert d.stats()["direct_readahead_bytes"] == 0
    await d.aclose()
    d = await FileDisk.open(parse_uri(path))
    for off in range(0, 32 * MIB, MIB):
        got = await d.read(off, MIB)
        assert bytes(got) == data[off:off + MIB], off
    s = d.stats()
    assert s["direct_readahead_bytes"] > 0
    assert s["direct_readahead_hits"] >= 32 - 4 - 1 - 2, s  # all but the streak's first
    assert s["direct_buffers_reused"] > 0, s
    await d.aclose()


async def test_idle_read_buffers_are_given_back_after_a_second(big_file, mock_clock) -> None:
    """The pool is for bursts of reads: a second with no read empties it
    (the daemon's memory after the guest's first touches).  The clock moves
    only when told: the read's own wait for the disk does not move it."""
    path, data = big_file
    pool(0)  # what earlier tests left
    pool(direct.POOL_BYTES)
    d = await FileDisk.open(parse_uri(path))
    got = await d.read(MIB, 2 * MIB)  # a large read: its own Buffer, answered as a view
    assert isinstance(got, memoryview) and bytes(got) == data[MIB:3 * MIB]
    del got
    gc.collect()
    assert pool()[:2] == (1, 2 * MIB)
    for step, idle in ((0.5, 1), (1.0, 1), (1.0, 0)):  # ticks at 1 s (looks), 2 s (gives back)
        mock_clock.jump(step)
        await trio.testing.wait_all_tasks_blocked()
        assert pool()[0] == idle, step
    await d.aclose()


def test_the_module_names_what_it_offers() -> None:
    assert {"AIO", "Buffer", "verify", "span", "scatter", "has_xxh3", "pool"} <= set(dir(_fast))
