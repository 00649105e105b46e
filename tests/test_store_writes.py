"""The store writes of a prefetch batch (memfs.store.page_writes): few large
writes, and still nothing but the fetched pages' bytes and zeros where the
page map says zero.  DESIGN.md invariant 2: a page the guest wrote (LOCAL)
is never overwritten by a batch, nor is a remote page that was not fetched.
The writes go to a real store file and are read back."""

from __future__ import annotations

import os
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.store import BRIDGE_ZEROS, LocalStore, page_writes

PS = 4096
ZERO, KEPT, LOCAL, UNFETCHED = 0, 1, 2, 3
SENTINEL = 0xA5


def _got(kinds: list[int], contiguous: bool) -> dict[int, memoryview]:
    """The kept pages' bytes: views of one read buffer (as a coalesced read
    gives them, gaps bridged with junk), or one buffer per page."""
    if contiguous:
        buf = memoryview(bytearray(os.urandom(len(kinds) * PS)))
        return {p: buf[p * PS:(p + 1) * PS] for p, k in enumerate(kinds) if k == KEPT}
    return {p: memoryview(os.urandom(PS)) for p, k in enumerate(kinds) if k == KEPT}


def _stretches(pages: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and sum(out[-1]) == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(st.sampled_from([ZERO, KEPT, KEPT, LOCAL, UNFETCHED]),
                      min_size=1, max_size=40),
       contiguous=st.booleans())
def test_batch_writes_touch_only_kept_and_zero_pages(tmp_path_factory, kinds: list[int],
                                                    contiguous: bool) -> None:
    """Any mix of page states: after the batch's writes the store holds each
    kept page's bytes, zeros or the old bytes at a zero page, and the old
    bytes (a guest's write) at every LOCAL or unfetched page."""
    got = _got(kinds, contiguous)
    spans = _stretches(sorted(got))
    writes = page_writes(PS, spans, got, lambda a, b: all(k == ZERO for k in kinds[a:b]))
    # one write per group of stretches separated by small all-zero gaps
    groups = 1 if spans else 0
    for (a, n), (b, _) in zip(spans, spans[1:]):
        gap = kinds[a + n:b]
        groups += not (len(gap) * PS <= BRIDGE_ZEROS and all(k == ZERO for k in gap))
    assert len(writes) == groups

    store = LocalStore(str(tmp_path_factory.mktemp("store")))
    try:
        store.open_region("ram0", len(kinds) * PS)
        old = bytes([SENTINEL]) * (len(kinds) * PS)
        os.pwrite(store._fd("ram0"), old, 0)
        if writes:
            trio.run(store.write_many, "ram0", writes)
        have = os.pread(store._fd("ram0"), len(kinds) * PS, 0)
    finally:
        store.close()
    for p, k in enumerate(kinds):
        page = have[p * PS:(p + 1) * PS]
        if k == KEPT:
            assert page == bytes(got[p]), f"kept page {p}"
        elif k == ZERO:
            assert page in (bytes(PS), old[:PS]), f"zero page {p}"
        else:
            assert page == old[:PS], f"page {p} ({'LOCAL' if k == LOCAL else 'unfetched'}) overwritten"


def test_a_batch_of_stretches_between_zero_pages_is_one_write(tmp_path: Path) -> None:
    """The bench's mix: stretches of remote pages between single zero pages,
    1024 pages read in one buffer -> one write of iovecs, each stretch one
    view of the read buffer (no copy)."""
    kinds = [KEPT, KEPT, KEPT, ZERO] * 256
    got = _got(kinds, contiguous=True)
    spans = _stretches(sorted(got))
    writes = page_writes(PS, spans, got, lambda a, b: all(k == ZERO for k in kinds[a:b]))
    assert len(writes) == 1
    offset, parts = writes[0]
    assert offset == 0
    assert [len(v) for v in parts[:3]] == [3 * PS, PS, 3 * PS]
    assert sum(len(v) for v in parts) == (len(kinds) - 1) * PS
