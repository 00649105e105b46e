"""The raw reads memfs is measured against: the same disk read directly in the
same run (a file with O_DIRECT or buffered preads, an NBD export with libnbd
or nbdcopy), so a figure is a ratio to what the disk gives anyone."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import trio

from benchlib.host import drop_caches, say

MIB = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"

# Raw NBD reads with libnbd (system python, package python3-libnbd): offsets
# on stdin (JSON), one pread each, one connection, one request in flight.
LIBNBD_LAT = r"""
import json, sys, time
import nbd
uri, req = sys.argv[1], int(sys.argv[2])
offsets = json.load(sys.stdin)
h = nbd.NBD()
h.connect_uri(uri)
h.pread(req, 0)  # connection warm; offset 0 is not in any sample
lat = []
for off in offsets:
    t = time.perf_counter()
    h.pread(req, off)
    lat.append(time.perf_counter() - t)
h.shutdown()
print(json.dumps(lat))
"""


def file_lat(path: str, offsets: list[int], req: int) -> list[float]:
    """O_DIRECT preads: every one is a real disk round trip."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, req)  # page-aligned, as O_DIRECT wants
    try:
        os.preadv(fd, [buf], 0)
        lat = []
        pc = time.perf_counter
        for off in offsets:
            t = pc()
            n = os.preadv(fd, [buf], off)
            lat.append(pc() - t)
            assert n == req
        return lat
    finally:
        buf.close()
        os.close(fd)


def file_buffered_lat(path: str, offsets: list[int], req: int) -> list[float]:
    """Buffered preads after drop_caches: the path memfs's file disk takes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        lat = []
        pc = time.perf_counter
        for off in offsets:
            t = pc()
            os.pread(fd, req, off)
            lat.append(pc() - t)
        return lat
    finally:
        os.close(fd)


def file_seq(path: str, size: int) -> float:
    """dd-like: 1 MiB buffered reads from 0 to ``size``; bytes/s."""
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(MIB)
    try:
        t = time.perf_counter()
        done = 0
        while done < size:
            n = os.preadv(fd, [buf], done)
            if not n:
                break
            done += n
        return done / (time.perf_counter() - t)
    finally:
        os.close(fd)


def file_seq_direct(path: str, size: int, chunk: int = 4 * MIB, depth: int = 4) -> float:
    """O_DIRECT reads of ``chunk`` bytes, ``depth`` in flight (threads), in
    order over [0, size): what the disk gives a reader with a queue."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bufs = [mmap.mmap(-1, chunk) for _ in range(depth)]
    free = list(range(depth))

    def one(off: int) -> int:
        i = free.pop()
        try:
            return os.preadv(fd, [bufs[i]], off)
        finally:
            free.append(i)
    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(depth) as ex:
            done = sum(ex.map(one, range(0, size, chunk)))
        return done / (time.perf_counter() - t)
    finally:
        for b in bufs:
            b.close()
        os.close(fd)


def nbd_lat(uri: str, offsets: list[int], req: int) -> tuple[list[float], str]:
    """libnbd preads (memfs's own client without python3-libnbd): the
    latencies and which client gave them."""
    if os.path.exists(SYSTEM_PYTHON):
        r = subprocess.run([SYSTEM_PYTHON, "-c", LIBNBD_LAT, uri, str(req)],
                           input=json.dumps(offsets), capture_output=True, text=True,
                           timeout=300)
        if r.returncode == 0:
            return json.loads(r.stdout), "libnbd pread (python3-libnbd), 1 connection, qd 1"
        say("bench", f"libnbd unavailable ({r.stderr.strip()[-200:]}); "
                     "using memfs's NBD client")
    return trio.run(_memfs_nbd_lat, uri, offsets, req), "memfs NBDDisk, 1 connection, qd 1"


async def _memfs_nbd_lat(uri: str, offsets: list[int], req: int) -> list[float]:
    from memfs.disks import parse_uri
    from memfs.disks.nbd import NBDDisk
    disk = await NBDDisk.open(parse_uri(uri), connections=1, timeout=30)
    try:
        await disk.read(0, req)
        lat = []
        for off in offsets:
            t = time.perf_counter()
            await disk.read(off, req)
            lat.append(time.perf_counter() - t)
        return lat
    finally:
        await disk.aclose()


def nbd_seq(uri: str, size: int) -> tuple[float, str]:
    """nbdcopy of the export to null: bytes/s and how it was read."""
    argv = ["nbdcopy", uri, "null:"]
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    return size / (time.perf_counter() - t), " ".join(argv[:1] + ["URI", "null:"]) + \
        " (defaults: 4 connections, 64 requests in flight)"


def seq(kind: str, target: str, size: int) -> tuple[float, str]:
    """A sequential read of the whole disk after drop_caches: bytes/s and
    how.  A file disk: the better of buffered 1 MiB preads and O_DIRECT
    4 MiB reads, 4 in flight; NBD: nbdcopy."""
    drop_caches()
    if kind != "file":
        return nbd_seq(target, size)
    dd = file_seq(target, size)
    drop_caches()
    direct = file_seq_direct(target, size)
    return max(dd, direct), (
        f"the better of buffered 1 MiB preads (dd bs=1M, {dd / MIB:.0f} MiB/s) and "
        f"O_DIRECT 4 MiB reads 4 in flight ({direct / MIB:.0f} MiB/s) of the volume "
        "file, after drop_caches")


def lat(kind: str, target: str, offsets: list[int], req: int) -> tuple[list[float], str]:
    """``req``-byte reads at ``offsets`` of a file disk or an NBD export, one
    at a time: latencies and how they were read."""
    if kind == "file":
        return file_lat(target, offsets, req), \
            f"O_DIRECT pread {_size(req)} of the volume file, qd 1"
    return nbd_lat(target, offsets, req)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= MIB else f"{n >> 10} KiB"
