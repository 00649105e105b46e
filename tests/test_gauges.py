"""The page gauges are counters moved by every state change (no walk over the
pages per snapshot): after a random workload they equal a full recount."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

from fakes import GatedDisk, deferred_writes
from memfs.fetcher import Fetcher
from memfs.volume import remote_split
from memfs.pagemap import PageMap, PageState, Region, checksum
from memfs.pages import PageServer
from memfs.stats import Stats
from memfs.store import LocalStore

PS = 4096
NPAGES = 256


def recount(server: PageServer) -> dict[str, int]:
    """The gauges the slow way, as they were computed before the tally."""
    pm = server.pagemap
    assert pm is not None
    out = dict(pm.counts())
    out.update(remote_split(pm))
    out["pages_served"] = sum(e - s for r in pm.regions for s, e in server.served.runs(r.name))
    return out


def gauges(server: PageServer) -> dict[str, int]:
    snap = server.stats.snapshot()
    return {k: snap[k] for k in ("pages_total", "pages_zero", "pages_remote", "pages_local",
                                 "pages_on_volume", "pages_on_disks", "pages_served")}


def two_disk_map(rng: random.Random) -> tuple[PageMap, list[bytes]]:
    """Pages spread over two disks (the volume first), some zero."""
    datas = [rng.randbytes(NPAGES * PS), rng.randbytes(NPAGES * PS)]
    pm = PageMap(disks=["gated://vol", "gated://other"], meta={"volume": "gated://vol"})
    for name in ("ram0", "ram1"):
        r = Region.empty(name, NPAGES * PS)
        for p in range(NPAGES):
            k = rng.random()
            if k < 0.2:
                continue
            d = 0 if k < 0.7 else 1
            r.set_remote(p, d, p * PS, checksum(datas[d][p * PS:(p + 1) * PS]))
        pm.regions.append(r)
    return pm, datas


@pytest.mark.parametrize("seed", range(6))
async def test_gauges_equal_a_full_recount_after_a_random_workload(tmp_path, seed) -> None:
    rng = random.Random(seed)
    pm, datas = two_disk_map(rng)
    stats = Stats()
    server = PageServer({r.name: r.size for r in pm.regions},
                        LocalStore(str(tmp_path / "store")), stats)
    disks = [GatedDisk(d, gated=False) for d in datas]
    fetcher = Fetcher(disks, stats, max_gap=rng.choice([0, 8 * PS]))
    server.install(pm, fetcher)
    assert gauges(server) == recount(server)
    async with AsyncExitStack() as bg:
        if seed % 2:  # deferred store writes, or inline
            await bg.enter_async_context(deferred_writes(server))
        for _ in range(120):
            r = rng.choice(pm.regions)
            p = rng.randrange(NPAGES)
            n = rng.randint(1, 12)
            op = rng.random()
            if op < 0.35:
                await server.read(r.name, p * PS + rng.randrange(PS), n * PS)
            elif op < 0.55:
                off = p * PS + rng.randrange(PS)
                await server.write(r.name, off, rng.randbytes(min(n * 1000, r.size - off)))
            elif op < 0.7:  # the prefetcher's way: fetch at prefetch priority, keep
                want = [q for q in range(p, min(p + 4 * n, NPAGES))
                        if r.states[q] == PageState.REMOTE]
                if want:
                    await server.keep(r, await fetcher.fetch(r, want, prefetch=True))
            elif op < 0.8:  # sync: a local page written back as zeros is zero again
                if r.states[p] == PageState.LOCAL:
                    r.set_zero(p)
            elif op < 0.9:  # a page given a location again (a handover, a capture)
                d = rng.randrange(2)
                r.set_remote(p, d, p * PS, checksum(datas[d][p * PS:(p + 1) * PS]))
            else:  # restore from a journal: a stretch made local
                r.set_states(p, min(p + n, NPAGES), PageState.LOCAL)
            if rng.random() < 0.2:
                await trio.testing.wait_all_tasks_blocked()
                assert gauges(server) == recount(server)
        await trio.testing.wait_all_tasks_blocked()
    assert gauges(server) == recount(server)
    # and the content: every page as the workload left it can still be read
    for r in pm.regions:
        await server.read(r.name, 0, r.size)
    assert gauges(server) == recount(server)


def test_the_tally_of_a_loaded_map_counts_each_disk(tmp_path) -> None:
    pm, _ = two_disk_map(random.Random(9))
    pm.save(tmp_path / "pm")
    loaded = PageMap.load(tmp_path / "pm")
    for r in loaded.regions:
        t = r.start_tally(len(loaded.disks))
        assert (t.zero, t.local) == (r.count(PageState.ZERO), r.count(PageState.LOCAL))
        for d in range(2):
            assert t.remote[d] == sum(1 for p in range(r.npages)
                                      if r.states[p] == PageState.REMOTE and r.disks[p] == d)
        assert t.remote_total == r.count(PageState.REMOTE)
