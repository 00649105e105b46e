"""Streak push (memfs.streak): the detector alone, the pusher with a fake
kernel, and a real mount touched in order through mmap by a child process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.pagemap import PageMap, PageState, Region
from memfs.stats import Stats
from memfs.streak import Streak, StreakPusher, worth_pushing
from ramimage import PS, drop_caches, make_ram, memfs, mounted, read_stat

MIB = 256  # pages


def _streak(**kw: int) -> Streak:
    return Streak(64 * MIB, PS, trigger=4 << 20, window=8 << 20, depth=2, lead=1 << 20, **kw)


def test_in_order_reads_push_ahead_once_past_the_trigger() -> None:
    s = _streak()
    assert [s.read(i * MIB, (i + 1) * MIB) for i in range(4)] == [None] * 4  # 4 MiB: not yet
    # the fifth MiB: a push from a MiB past the streak's end, half the window
    assert s.read(4 * MIB, 5 * MIB) == (6 * MIB, 10 * MIB)
    assert s.read(5 * MIB, 6 * MIB) == (10 * MIB, 14 * MIB)  # the second, side by side
    assert s.read(6 * MIB, 7 * MIB) is None  # two in flight: no third
    s.done(6 * MIB, 10 * MIB)
    # the push's own READs teach nothing; the guest's next one pushes on,
    # never more than LEAD + WINDOW past the streak's end
    assert s.read(11 * MIB, 12 * MIB) is None
    assert s.read(7 * MIB, 8 * MIB) == (14 * MIB, 17 * MIB)


def test_a_huge_page_fault_is_no_streak() -> None:
    """The kernel reads 4 MiB around a MADV_HUGEPAGE fault: four 1 MiB READs
    in order, then elsewhere.  Nothing is pushed."""
    s = _streak()
    for chunk in (3, 9, 1, 14, 6):
        for i in range(4):
            assert s.read(chunk * 4 * MIB + i * MIB, chunk * 4 * MIB + (i + 1) * MIB) is None


def test_a_read_elsewhere_ends_the_streak() -> None:
    s = _streak()
    for i in range(5):
        s.read(i * MIB, (i + 1) * MIB)
    assert s.pushing
    assert s.read(40 * MIB, 41 * MIB) is None  # a new streak, one MiB long
    s.done(*s.pushing[0])
    assert s.read(41 * MIB, 42 * MIB) is None


def test_small_reads_and_the_end_of_the_region() -> None:
    s = Streak(6 * MIB, PS, trigger=1 << 20, window=8 << 20, depth=2, lead=1 << 20)
    got = [s.read(p, p + 32) for p in range(0, 2 * MIB, 32)]  # 128 KiB READs
    pushes = [g for g in got if g]
    assert pushes == [(3 * MIB, 6 * MIB)]  # clipped at the region's end
    s.done(3 * MIB, 6 * MIB)
    assert s.read(2 * MIB, 2 * MIB + 32) is None  # nothing left to push


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63 * MIB), st.integers(1, MIB), st.booleans(),
                          st.integers(0, 3)), max_size=80))
def test_pushes_stay_bounded_and_never_overlap(reads: list[tuple[int, int, bool, int]]) -> None:
    """Whatever the READs: pushes lie inside the region, ahead of the READ
    that asked, at most DEPTH in flight, and never two on the same page."""
    s = _streak()
    for first, n, finish, which in reads:
        end = min(first + n, s.npages)
        if finish and s.pushing:
            s.done(*s.pushing[which % len(s.pushing)])
        got = s.read(first, end)
        assert len(s.pushing) <= 2
        if got is None:
            continue
        lo, hi = got
        assert 0 <= lo < hi <= s.npages
        assert lo >= s.end and hi <= s.end + s.lead + s.window
        others = [p for p in s.pushing if p != got]
        assert all(hi <= a or b <= lo for a, b in others)


def test_only_ranges_with_remote_pages_are_worth_a_push() -> None:
    r = Region.empty("ram0", 64 * PS)
    r.set_remote(40, 0, 0, 0)
    r.set_states(20, 30, PageState.LOCAL)
    assert not worth_pushing(r, 0, 40)  # zero and local pages only
    assert worth_pushing(r, 30, 41)


class _File:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def test_the_pusher_pushes_counts_and_closes_its_file() -> None:
    """With a fake kernel: in-order READs start pushes of the range ahead,
    their pages are counted, and the push file is closed at stop."""
    stats = Stats()
    files: list[_File] = []
    pushed: list[tuple[int, int]] = []

    def populate(res: object, offset: int, length: int) -> int:
        pushed.append((offset // PS, (offset + length) // PS))
        return length // PS

    def opener(path: str) -> _File:
        files.append(_File())
        return files[-1]

    r = Region.empty("ram0", 64 * MIB * PS)
    for p in range(0, 64 * MIB, 2):
        r.set_remote(p, 0, p * PS, 0)
    pusher = StreakPusher(stats, window=8 << 20, depth=2, residency=opener,  # type: ignore[arg-type]
                          populate=populate)
    async with trio.open_nursery() as n:
        await n.start(pusher.run, "/nowhere")
        for i in range(6):
            pusher.observe(r, i * MIB, (i + 1) * MIB)
        with trio.fail_after(10):  # the pushes run in worker threads
            while stats.counters["streak_pushes"] < 2:
                await trio.sleep(0.01)
        await pusher.stop()
    assert sorted(pushed)[:2] == [(6 * MIB, 10 * MIB), (10 * MIB, 14 * MIB)]  # two threads
    assert stats.counters["streak_pushes"] == len(pushed)
    assert stats.counters["pages_streak_pushed"] == sum(b - a for a, b in pushed)
    assert len(files) == 1 and files[0].closed


_TOUCH = """
import mmap, os, sys
path, stamp_at, stamp_page = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
seen = bytearray()
for p in range(len(m) // 4096):
    if p == stamp_at:  # a guest write ahead of the streak, where pushes go
        m[stamp_page * 4096 + 8:stamp_page * 4096 + 16] = b"GUESTWR!"
    seen += m[p * 4096:(p + 1) * 4096]
m.flush()
sys.stdout.buffer.write(seen)
"""


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_a_sequential_touch_is_pushed_fetched_once_and_keeps_a_guest_write(
        tmp_path, monkeypatch) -> None:
    """A child touches a 32 MiB region in order through mmap and writes a
    page ahead of itself half-way: the bytes are the captured ones (and the
    write), pushes happened, every remote page was fetched once, and the
    write survives the pushes and a dropped page cache (invariant 3)."""
    path = str(tmp_path / "vm.ram")
    npages = 8192
    data = make_ram(path, npages)
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    remote = PageMap.load(pm).regions[0].count(PageState.REMOTE)
    want = bytearray(data)
    stamp_at, stamp_page = 3000, 3600
    want[stamp_page * PS + 8:stamp_page * PS + 16] = b"GUESTWR!"
    mnt = str(tmp_path / "mnt")
    monkeypatch.setenv("MEMFS_STREAK_WINDOW", str(8 << 20))
    with mounted(pm, mnt, "--no-prefetch", "--read-ahead-kb", "1024"):
        drop_caches()
        out = subprocess.run([sys.executable, "-c", _TOUCH, os.path.join(mnt, "ram0"),
                              str(stamp_at), str(stamp_page)],
                             capture_output=True, check=True, timeout=120).stdout
        assert out == bytes(want)
        assert read_stat(mnt, "pages_streak_pushed") > 0
        assert read_stat(mnt, "streak_pushes") > 0
        assert read_stat(mnt, "pages_fetched") == remote
        assert read_stat(mnt, "push_errors") == 0
        drop_caches()
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read() == bytes(want)


async def test_a_failed_push_is_counted_and_logged_and_the_guest_read_asks_again(
        caplog) -> None:
    """A push whose read through the kernel fails (one of its READs got EIO)
    is counted in push_errors and logged with the range; nothing else
    changes: the guest's own READ of those pages asks the disk again."""
    stats = Stats()

    def populate(res: object, offset: int, length: int) -> int:
        raise OSError(5, "Input/output error")

    r = Region.empty("ram0", 64 * MIB * PS)
    for p in range(0, 64 * MIB, 2):
        r.set_remote(p, 0, p * PS, 0)
    pusher = StreakPusher(stats, window=8 << 20, depth=2,
                          residency=lambda path: _File(),  # type: ignore[arg-type,return-value]
                          populate=populate)
    async with trio.open_nursery() as n:
        await n.start(pusher.run, "/nowhere")
        for i in range(5):
            pusher.observe(r, i * MIB, (i + 1) * MIB)
        with trio.fail_after(10):
            while stats.counters["push_errors"] < 1:
                await trio.sleep(0.01)
        await pusher.stop()
    assert stats.counters["push_errors"] == 1 and stats.counters["streak_pushes"] == 0
    assert "streak push of ram0 pages 1536..2559 failed: [Errno 5] Input/output error" \
        in caplog.text
    assert pusher._streaks["ram0"].pushing == []  # the window is free for the next push
