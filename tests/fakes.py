"""Gated fakes for deterministic race tests without a kernel.

A disk whose reads (or writes) wait at a gate the test opens, a store whose
batched writes wait too, and a page map over such a disk: with
``trio.testing.wait_all_tasks_blocked`` (and ``trio.testing.Sequencer``) a
test puts every task exactly where it wants before the next step.  Only
pure-logic layers are faked this way; mounts, NBD servers and guests stay
real in the other tests.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio
import trio.testing

from memfs.disks.base import Disk, DiskError
from memfs.fetcher import Fetcher
from memfs.pagemap import PageMap, Region, checksum
from memfs.pages import PageServer
from memfs.stats import Stats
from memfs.store import LocalStore

PS = 4096
NPAGES = 64


def content(p: int) -> bytes:
    """Page ``p``'s captured content: one byte value, never zeros."""
    return bytes([(p * 7 + 1) & 0xFF]) * PS


class GatedDisk(Disk):
    """An in-memory disk.  Reads wait for ``open()`` (unless ``gated`` is
    False) and are logged as (offset, length); writes wait for
    ``write_gate``.  ``fail_next`` reads fail, ``corrupt_next`` reads return
    flipped bytes (a page that does not verify)."""

    def __init__(self, data: bytes | int, gated: bool = True, uri: str = "gated://test") -> None:
        self.uri = uri
        self.data = bytearray(data)
        self.size = len(self.data)
        self.reads: list[tuple[int, int]] = []
        #: set by the first read: a test waits for a task that gets there via a thread
        self.read_seen = trio.Event()
        self.gated = gated
        self.gate = trio.Event()
        self.write_gate = trio.Event()
        self.write_gate.set()
        self.writes = 0
        self.fail_next = 0
        self.corrupt_next = 0

    def open(self) -> None:
        self.gate.set()

    def close_gate(self) -> None:
        self.gate = trio.Event()

    async def read(self, offset: int, length: int, *, deadline: float | None = None) -> bytes:
        self.reads.append((offset, length))
        self.read_seen.set()
        if self.gated:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise DiskError(f"{self.uri}: read of {length} bytes at {offset} failed")
        out = bytes(self.data[offset:offset + length])
        if self.corrupt_next:
            self.corrupt_next -= 1
            out = bytes(b ^ 0xFF for b in out)
        return out

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self.write_gate.wait()
        self.data[offset:offset + len(data)] = data
        self.writes += 1

    async def aclose(self) -> None:
        pass


class GatedStore(LocalStore):
    """A real store whose batched writes (fetched pages) wait for ``gate``."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.gate = trio.Event()
        self.gate.set()

    async def write_many(self, region, items) -> None:  # type: ignore[override]
        await self.gate.wait()
        await super().write_many(region, items)


def make_map() -> tuple[PageMap, bytes]:
    """Every page remote at the identity offset, except page 0 (zero)."""
    data = b"".join(content(p) for p in range(NPAGES))
    r = Region.empty("ram0", NPAGES * PS)
    for p in range(1, NPAGES):
        r.set_remote(p, 0, p * PS, checksum(content(p)))
    return PageMap(disks=["gated://test"], regions=[r]), data


def setup(tmp_path, *, retries: int = 3, install: bool = True
          ) -> tuple[PageServer, Fetcher, GatedDisk, Stats, GatedStore, PageMap]:
    """A page server over a gated disk and a gated store (installed unless
    ``install`` is False: the test installs the map when it chooses)."""
    pm, data = make_map()
    disk = GatedDisk(data)
    stats = Stats()
    store = GatedStore(str(tmp_path / "store"))
    server = PageServer({"ram0": NPAGES * PS}, store, stats)
    fetcher = Fetcher([disk], stats, retries=retries, retry_delay=0.001, max_gap=0)
    if install:
        server.install(pm, fetcher)
    return server, fetcher, disk, stats, store, pm


@asynccontextmanager
async def deferred_writes(server: PageServer) -> AsyncIterator[None]:
    """The page server's deferred store writes run in the background inside
    the block (as in the daemon); at its end the ones that can land land,
    then the rest are cancelled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run_background)
        yield
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
