"""The file disk's O_DIRECT + AIO reads (memfs.disks.direct, memfs._fast).

Real files on a real disk (/var/tmp: O_DIRECT works there) and on tmpfs
(/dev/shm: O_DIRECT is refused, the file disk reads through the page cache).
"""

from __future__ import annotations

import mmap
import os
import random

import pytest
import trio

from memfs._fast import AIO
from memfs.disks import DiskError, parse_uri
from memfs.disks.file import FileDisk

SIZE = 8 << 20


@pytest.fixture
def disk_file() -> tuple[str, bytes]:
    data = random.Random(3).randbytes(SIZE + 1000)  # ends mid-block: a short last read
    d = "/var/tmp" if os.path.isdir("/var/tmp") else "/tmp"
    path = os.path.join(d, f"memfs-direct-{os.getpid()}.img")
    with open(path, "wb") as f:
        f.write(data)
    yield path, data
    os.unlink(path)


async def test_reads_match_the_file_at_any_size_and_alignment(disk_file) -> None:
    path, data = disk_file
    d = await FileDisk.open(parse_uri(path))
    assert d._direct is not None, "O_DIRECT should work on /var/tmp"
    cases = [(0, 4096), (4096 * 3, 65536), (1 << 20, 4 << 20), (512, 1024),
             (100, 4096), (SIZE - 4096, 4096 + 1000), (SIZE, 1000)]
    for off, n in cases:
        got = await d.read(off, n)
        assert bytes(got) == data[off:off + n], (off, n)
    with pytest.raises(DiskError) as e:
        await d.read(SIZE, 4096)
    assert str(e.value) == f"{path}: read of 4096 bytes at {SIZE} is beyond the end " \
                           f"({SIZE + 1000} bytes)"
    await d.aclose()


async def test_many_reads_in_flight_and_a_cancelled_one(disk_file) -> None:
    path, data = disk_file
    d = await FileDisk.open(parse_uri(path))
    rng = random.Random(7)
    got: dict[tuple[int, int], bytes] = {}

    async def one(off: int, n: int) -> None:
        got[off, n] = bytes(await d.read(off, n))
    async with trio.open_nursery() as nursery:
        for _ in range(300):
            n = 4096 * rng.choice([1, 2, 16, 64, 300])
            off = rng.randrange(0, (SIZE - n) // 4096) * 4096
            nursery.start_soon(one, off, n)
    assert all(v == data[o:o + n] for (o, n), v in got.items())
    with trio.move_on_after(0):  # cancelled while the kernel reads into its buffer
        await d.read(0, 4 << 20)
    assert d._direct is not None
    for _ in range(100):  # the abandoned read is reaped by a later read's wait
        assert bytes(await d.read(8192, 4096)) == data[8192:12288]
        if not d._direct._aio.inflight:
            break
        await trio.sleep(0.01)
    assert d._direct._aio.inflight == 0
    await d.aclose()


async def test_tmpfs_file_reads_the_same() -> None:
    """tmpfs takes O_DIRECT on this kernel (>= 6.6); the bytes are the same."""
    path = f"/dev/shm/memfs-direct-{os.getpid()}.img"
    data = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(data)
    try:
        d = await FileDisk.open(parse_uri(path))
        assert bytes(await d.read(4096, 8192)) == data[4096:12288]
        assert bytes(await d.read(100, 8192)) == data[100:8292]
        await d.aclose()
    finally:
        os.unlink(path)


def test_aio_reports_errno_of_a_failed_read(disk_file) -> None:
    path, _ = disk_file
    aio = AIO(4)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    aligned = mmap.mmap(-1, 4096)
    try:
        aio.submit(fd, memoryview(aligned)[:1000], 0, "short")  # length not in blocks
        done = []
        while not done:
            done = aio.reap()
        assert done == [("short", -22)]
        with pytest.raises(BufferError) as e:
            aio.submit(fd, b"read-only", 0, "ro")
        assert str(e.value) == "Object is not writable."
        assert aio.inflight == 0
    finally:
        aio.close()
        os.close(fd)
    with pytest.raises(ValueError) as e:
        aio.submit(0, aligned, 0, "x")
    assert str(e.value) == "AIO context is closed"


async def test_reads_in_order_are_answered_from_the_read_ahead(disk_file) -> None:
    """Sequential reads (with gaps, as zero pages leave them, and reads
    across a window's end) return the file's bytes, most from the windows."""
    path, data = disk_file
    d = await FileDisk.open(parse_uri(path))
    off, n, i = 0, 128 << 10, 0
    while off + n <= SIZE:
        got = await d.read(off, n)
        assert bytes(got) == data[off:off + n], off
        i += 1
        off += n + (8192 if i % 5 == 0 else 0) - (4096 if i % 7 == 0 else 0)
    s = d.stats()
    assert s["direct_readahead_hits"] > i // 2, s
    async with trio.open_nursery() as nursery:  # in order, several at once
        for k in range(16):
            nursery.start_soon(d.read, k * 65536, 65536)
    await d.aclose()
