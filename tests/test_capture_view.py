"""Capture's later passes (the unchanged-chunk fast path) and its onward mode
(``view``: the page map a memfs mount saved), without FUSE or QEMU.

The view mode's promise is about reads: a page the view marks remote is never
read.  Here the RAM file holds garbage at those pages, so reading one would
show up as a wrong location or a write.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memfs.capture import CHUNK, CaptureError, capture
from memfs.pagemap import PAGE_SIZE, PageMap, PageState, Region, checksum

PS = PAGE_SIZE
NPAGES = 3 * CHUNK // PS + 5        # several chunks and a short one


def page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PS // 8)


def content_at(pm: PageMap, name: str, p: int) -> bytes:
    r = pm.region(name)
    if r.states[p] == PageState.ZERO:
        return bytes(PS)
    with open(pm.disks[r.disks[p]], "rb") as f:
        f.seek(r.offsets[p])
        data = f.read(PS)
    assert checksum(data) == r.checksums[p]
    return data


def write_ram(path: Path, pages: list[bytes]) -> None:
    path.write_bytes(b"".join(pages))


async def test_later_pass_takes_unchanged_chunks_whole(tmp_path: Path) -> None:
    pages = [bytes(PS) if p % 3 == 0 else page(p + 1) for p in range(NPAGES)]
    ram, vol = tmp_path / "ram", str(tmp_path / "vol")
    write_ram(ram, pages)
    await capture([("ram0", str(ram))], vol, str(tmp_path / "pm1"), progress=False)
    # chunk 0 unchanged; chunk 1: a zero page gets content; chunk 2: a page
    # changes, another becomes zero
    per = CHUNK // PS
    pages[per + 3] = page(10 ** 6)
    pages[2 * per + 1] = page(10 ** 7)
    pages[2 * per + 2] = bytes(PS)
    write_ram(ram, pages)
    res = await capture([("ram0", str(ram))], vol, str(tmp_path / "pm2"),
                        base=str(tmp_path / "pm1"), progress=False)
    assert res.pages_written == 2
    assert res.pages_total == NPAGES
    assert res.pages_zero == sum(1 for x in pages if x == bytes(PS))
    assert res.pages_unchanged == NPAGES - res.pages_zero - 2
    pm2 = PageMap.load(tmp_path / "pm2")
    for p in range(NPAGES):
        assert content_at(pm2, "ram0", p) == pages[p], p


def mount_view(tmp_path: Path, states: list[int], vol1: str,
               sums: dict[int, int]) -> str:
    """A view as ``save`` writes it: remote pages on vol1, local pages with
    the location and checksum they arrived with."""
    r = Region.empty("ram0", NPAGES * PS)
    for p, st in enumerate(states):
        if st != PageState.ZERO and p in sums:
            r.set_remote(p, 0, p * PS, sums[p])
        r.states[p] = st
    view = PageMap(disks=[vol1], regions=[r], meta={"view": "mount"})
    path = str(tmp_path / "view")
    view.save(path)
    return path


async def test_view_mode_reads_local_pages_only(tmp_path: Path) -> None:
    vol1, vol2 = str(tmp_path / "vol1"), str(tmp_path / "vol2")
    orig = [page(p + 1) for p in range(NPAGES)]
    with open(vol1, "wb") as f:
        f.write(b"".join(orig))
    R, Z, L = PageState.REMOTE, PageState.ZERO, PageState.LOCAL
    states = [R if p % 4 == 0 else Z if p % 4 == 1 else L for p in range(NPAGES)]
    # what the guest's RAM holds now
    ram = []
    for p, st in enumerate(states):
        if st == R:
            ram.append(b"\xee" * PS)           # never read: garbage proves it
        elif st == Z:
            ram.append(b"\xdd" * PS)           # never handed out: stays zero
        elif p % 3 == 0:
            ram.append(orig[p])                # arrived from vol1, unchanged
        elif p % 3 == 1:
            ram.append(page(10 ** 6 + p))      # the guest changed it
        else:
            ram.append(bytes(PS))              # the guest zeroed it
    write_ram(tmp_path / "ram", ram)
    sums = {p: checksum(orig[p]) for p in range(NPAGES)}
    view = mount_view(tmp_path, states, vol1, sums)
    res = await capture([("ram0", str(tmp_path / "ram"))], vol2, str(tmp_path / "out"),
                        view=view, progress=False)
    n_remote, n_zero, n_local = (states.count(s) for s in (R, Z, L))
    assert res.pages_kept == n_remote
    assert res.pages_read == n_local
    changed = [p for p in range(NPAGES) if states[p] == L and p % 3 == 1]
    assert res.pages_written == len(changed)
    assert res.bytes_written == len(changed) * PS
    out = PageMap.load(tmp_path / "out")
    assert out.disks[0] == vol2 and vol1 in out.disks
    r = out.region("ram0")
    for p, st in enumerate(states):
        if st == R or (st == L and p % 3 == 0):
            assert r.states[p] == R and out.disks[r.disks[p]] == vol1 and r.offsets[p] == p * PS
            assert content_at(out, "ram0", p) == orig[p]
        elif st == Z or p % 3 == 2:
            assert r.states[p] == Z
        else:
            assert out.disks[r.disks[p]] == vol2
            assert content_at(out, "ram0", p) == ram[p]

    # a later pass on top, as memfs migrate runs it
    ram[changed[0]] = page(42)
    write_ram(tmp_path / "ram", ram)
    res2 = await capture([("ram0", str(tmp_path / "ram"))], vol2, str(tmp_path / "out2"),
                         view=view, base=str(tmp_path / "out"), progress=False)
    assert res2.pages_written == 1 and res2.pages_kept == n_remote
    out2 = PageMap.load(tmp_path / "out2")
    assert content_at(out2, "ram0", changed[0]) == page(42)
    assert content_at(out2, "ram0", changed[1]) == ram[changed[1]]


async def test_view_must_come_from_a_mount(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(os.urandom(4 * PS))
    await capture([("ram0", str(ram))], str(tmp_path / "vol"), str(tmp_path / "pm"),
                  progress=False)
    with pytest.raises(CaptureError, match="not a page map saved by a memfs mount"):
        await capture([("ram0", str(ram))], str(tmp_path / "vol2"), str(tmp_path / "pm2"),
                      view=str(tmp_path / "pm"), progress=False)
