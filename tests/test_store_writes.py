"""The store writes of a prefetch batch (memfs.store.page_writes): few large
writes, and still nothing but the fetched pages' bytes and zeros where the
page map says zero.  DESIGN.md invariant 2: a page the guest wrote (LOCAL)
is never overwritten by a batch, nor is a remote page that was not fetched.
The writes go to a real store file and are read back."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.pagemap import PageState
from memfs.store import BRIDGE_ZEROS, LocalStore, page_writes
from ramimage import small_tmpfs
from test_fetcher import captured, make_server

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


async def test_a_batch_into_a_full_store_keeps_nothing_and_spares_a_guest_page(
        tmp_path, ram, caplog) -> None:
    """A prefetch batch whose store write runs out of space: no page is
    kept (all stay remote, served from the disk), the error is counted and
    logged, and the page the guest wrote between two of its stretches (a
    zero page that a batch would otherwise fill with zeros) keeps its bytes."""
    pm, data, _ = await captured(tmp_path, ram)
    r = pm.region("ram0")
    st_ = r.states
    remote = [p for p in range(r.npages) if st_[p] == PageState.REMOTE]
    gap = next(p for p in range(1, r.npages - 1) if st_[p] == PageState.ZERO
               and st_[p - 1] == st_[p + 1] == PageState.REMOTE)
    with small_tmpfs(tmp_path / "store", "64k"):
        server, _, stats = await make_server(tmp_path, pm)
        try:
            guest = os.urandom(PS)
            await server.write("ram0", gap * PS, guest)
            t0 = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="memfs.pages"):
                kept = await server.prefetch(r, remote)
            took = time.monotonic() - t0
            assert kept == []
            assert stats.counters["store_write_errors"] == 1
            assert all(st_[p] == PageState.REMOTE for p in remote)
            assert st_[gap] == PageState.LOCAL
            msg = f"ram0: {len(remote)} fetched pages not kept: [Errno 28] No space left on device"
            assert msg in caplog.messages
            want = bytearray(data)
            want[gap * PS:(gap + 1) * PS] = guest
            assert await server.read("ram0", 0, len(data)) == want
            store = os.pread(server.store._fd("ram0"), PS, gap * PS)
            assert store == guest
        finally:
            server.store.close()
    print(f"\nbatch of {len(remote)} pages into a full store: refused in {took * 1000:.1f} ms")
