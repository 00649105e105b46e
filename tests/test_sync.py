"""The background copy of a source mount (memfs.sync) without a kernel: a
WRITE that races a copy is never lost, a base + delta equals a flush.

Deterministic: the volume is an in-memory disk (tests/fakes.py) whose writes
wait at a gate the test opens, and ``wait_all_tasks_blocked`` says when the
copy sits there.
"""

from __future__ import annotations

import random
from array import array

import pytest
import trio
import trio.testing
import xxhash

from fakes import GatedDisk
from memfs.handover import apply_delta, mark_base
from memfs.pagemap import ZERO_CHECKSUM, PageMap, PageState, Region
from memfs.pages import PageServer
from memfs.stats import Stats
from memfs.store import LocalStore
from memfs.sync import VolumeSync, export, export_delta

PS = 4096
N = 64


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PS)


@pytest.fixture
def source(tmp_path):
    store = LocalStore(str(tmp_path / "store"))
    pages = PageServer({"ram0": N * PS}, store, Stats())
    vol = GatedDisk(N * PS + PS, gated=False, uri="mem://vol")
    pm = PageMap(disks=[vol.uri], regions=[Region.empty("ram0", N * PS)])
    pages.install(pm, None)  # type: ignore[arg-type]  # no remote page: no fetcher

    async def no_writeback() -> None:
        pass
    sync = VolumeSync(pages, vol, pages.stats, no_writeback)
    yield pages, sync, vol
    store.close()


def volume_page(vol: GatedDisk, r: Region, p: int) -> bytes:
    return bytes(vol.data[r.offsets[p]:r.offsets[p] + PS])


async def test_write_racing_a_copy_is_copied_again(source) -> None:
    pages, sync, vol = source
    await pages.write("ram0", 5 * PS, page(1))
    vol.write_gate = trio.Event()                # the copy will wait in its volume write
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync.copy_dirty)
        await trio.testing.wait_all_tasks_blocked()
        assert pages.dirty.count == 0            # cleared before the store was read
        await pages.write("ram0", 5 * PS, page(2))   # the guest writes again meanwhile
        assert pages.dirty.count == 1
        vol.write_gate.set()
    r = pages.pagemap.region("ram0")
    assert pages.dirty.is_dirty("ram0", 5)       # the racing WRITE is still to be copied
    with pytest.raises(ValueError, match="still dirty"):
        export(pages.pagemap, pages.dirty.count)
    await sync.copy_dirty()
    pm = export(pages.pagemap, pages.dirty.count)
    r = pm.region("ram0")
    assert r.states[5] == PageState.REMOTE
    assert r.checksums[5] == xxhash.xxh3_64_intdigest(page(2))
    assert volume_page(vol, r, 5) == page(2)


async def test_zeros_written_back_make_a_zero_page(source) -> None:
    pages, sync, vol = source
    await pages.write("ram0", 3 * PS, page(3))
    await pages.write("ram0", 3 * PS, bytes(PS))
    await sync.copy_dirty()
    r = export(pages.pagemap, 0).region("ram0")
    assert r.states[3] == PageState.ZERO and r.checksums[3] == ZERO_CHECKSUM


async def test_base_plus_delta_equals_a_flush(source) -> None:
    """Writes before the base, writes racing it, writes after it: the base
    with the delta applied is the page map a flush would give."""
    pages, sync, vol = source
    rnd = random.Random(4)
    for p in rnd.sample(range(N), 20):
        await pages.write("ram0", p * PS, page(100 + p))
    await sync.copy_dirty()
    await pages.write("ram0", 7 * PS, page(700))     # dirty when the base is taken
    base = export(pages.pagemap, 0, allow_dirty=True)
    sync.changed = {n: bytearray(b) for n, b in pages.dirty.bits.items()}
    ident = mark_base(base)
    base = PageMap.loads(base.dumps())               # as the destination reads it
    for p in rnd.sample(range(N), 10):
        await pages.write("ram0", p * PS, page(200 + p) if p % 3 else bytes(PS))
    await sync.copy_dirty()
    delta = export_delta(pages.pagemap, pages.dirty.count, sync.changed, ident)
    final = export(pages.pagemap, pages.dirty.count)
    apply_delta(base, PageMap.loads(delta.dumps()))
    b, f = base.region("ram0"), final.region("ram0")
    assert (b.states, b.disks, array("Q", b.offsets), array("Q", b.checksums)) == \
        (f.states, f.disks, array("Q", f.offsets), array("Q", f.checksums))
    for p in range(N):
        if f.states[p] == PageState.REMOTE:
            assert xxhash.xxh3_64_intdigest(volume_page(vol, f, p)) == f.checksums[p], p
