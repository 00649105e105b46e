"""Base + delta hand-over of page maps (memfs.handover): pure data, no kernel."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.handover import apply_delta, make_delta, mark_base
from memfs.pagemap import PageMap, PageMapError, PageState, Region

N = 64


def pagemap(seed: int) -> PageMap:
    rnd = random.Random(seed)
    pm = PageMap(disks=["/vol"])
    for name in ("ram0", "ram1"):
        r = Region.empty(name, N * 4096)
        for p in rnd.sample(range(N), N // 2):
            r.set_remote(p, 0, p * 4096, rnd.getrandbits(64))
        pm.regions.append(r)
    return pm


def entries(pm: PageMap) -> list[tuple]:
    return [(r.name, p, r.states[p], r.disks[p], r.offsets[p], r.checksums[p])
            for r in pm.regions for p in range(r.npages)]


@given(st.lists(st.integers(0, 2 * N - 1), unique=True, max_size=2 * N))
@settings(max_examples=50, deadline=None)
def test_base_plus_delta_is_the_final_map(changed_pages: list[int]) -> None:
    base, final = pagemap(1), pagemap(1)
    ident = mark_base(base)
    changed = {"ram0": bytearray(N), "ram1": bytearray(N)}
    rnd = random.Random(len(changed_pages))
    for i in changed_pages:
        name, p = ("ram0", i) if i < N else ("ram1", i - N)
        changed[name][p] = 1
        r = final.region(name)
        if rnd.random() < 0.3:
            r.set_zero(p)
        else:
            r.set_remote(p, 0, (N + p) * 4096, rnd.getrandbits(64))
    delta = PageMap.loads(make_delta(final, changed, ident).dumps())  # through the file format
    assert sum(r.npages for r in delta.regions) == len(changed_pages)
    assert apply_delta(base, delta) == len(changed_pages)
    assert entries(base) == entries(final)


def test_a_delta_for_another_base_is_refused_whole() -> None:
    base, other = pagemap(1), pagemap(2)
    mark_base(base)
    ident = mark_base(other)
    changed = {"ram0": bytearray(b"\1" * N)}
    before = entries(base)
    with pytest.raises(PageMapError, match="applies to base"):
        apply_delta(base, make_delta(other, changed, ident))
    assert entries(base) == before


def test_out_of_range_and_foreign_regions_are_refused() -> None:
    base = pagemap(1)
    ident = mark_base(base)
    bigger = PageMap(disks=["/vol"], regions=[Region.empty("ram0", 2 * N * 4096)])
    bigger.region("ram0").set_remote(N + 3, 0, 0, 7)
    changed = {"ram0": bytearray(2 * N)}
    changed["ram0"][N + 3] = 1
    with pytest.raises(PageMapError, match="bad page list"):
        apply_delta(base, make_delta(bigger, changed, ident))
    foreign = PageMap(disks=["/vol"], regions=[Region.empty("ram9", N * 4096)])
    with pytest.raises(PageMapError, match="ram9"):
        apply_delta(base, make_delta(foreign, {"ram9": bytearray(b"\1" * N)}, ident))
    other_disks = pagemap(1)
    other_disks.disks[0] = "/elsewhere"
    with pytest.raises(PageMapError, match="disks"):
        apply_delta(base, make_delta(other_disks, {"ram0": bytearray(b"\1" * N)}, ident))
    assert all(s in (PageState.ZERO, PageState.REMOTE) for r in base.regions for s in r.states)
