"""Capture: classification, identity layout, incremental passes, errors."""

from __future__ import annotations

import os

import pytest

from memfs.capture import CaptureError, capture, layout, parse_ram_args
from memfs.pagemap import PageMap, PageState, checksum
from ramimage import PS, make_ram, memfs


def test_layout_aligns_regions() -> None:
    # the last entry is the volume size: the regions and the identity block
    assert layout([PS, 3 << 20]) == [0, 1 << 20, (4 << 20) + 4096]


def test_parse_ram_args() -> None:
    assert parse_ram_args(["/dev/shm/a", "pc.ram=/proc/1/fd/3"]) == [
        ("ram0", "/dev/shm/a"), ("pc.ram", "/proc/1/fd/3")]


async def test_pages_are_classified_and_written_at_identity(tmp_path, ram) -> None:
    path, data = ram
    vol, out = str(tmp_path / "vol"), str(tmp_path / "pm")
    res = await capture([("ram0", path)], vol, out, progress=False)
    pm = PageMap.load(out)
    r = pm.region("ram0")
    zero = sum(1 for p in range(r.npages) if data[p * PS:(p + 1) * PS] == bytes(PS))
    assert (res.pages_total, res.pages_zero, res.pages_written) == (r.npages, zero,
                                                                    r.npages - zero)
    assert res.bytes_written == res.pages_written * PS
    vbytes = open(vol, "rb").read()
    for p in range(r.npages):
        page = data[p * PS:(p + 1) * PS]
        if page == bytes(PS):
            assert r.states[p] == PageState.ZERO
        else:
            assert r.states[p] == PageState.REMOTE and r.offsets[p] == p * PS
            assert r.checksums[p] == checksum(page)
            assert vbytes[p * PS:(p + 1) * PS] == page


async def test_incremental_pass_rewrites_only_changed_pages(tmp_path, ram) -> None:
    path, data = ram
    vol, pm1, pm2 = str(tmp_path / "vol"), str(tmp_path / "pm1"), str(tmp_path / "pm2")
    first = await capture([("ram0", path)], vol, pm1, progress=False)
    changed = {1, 2, 5, 601}  # 5 was a zero page
    with open(path, "r+b") as f:
        for p in changed:
            f.seek(p * PS + 10)
            f.write(b"changed!")
    second = await capture([("ram0", path)], vol, pm2, base=pm1, progress=False)
    assert second.pages_written == len(changed)
    assert second.pages_unchanged == first.pages_written - (len(changed) - 1)
    assert second.hot_pages == len(changed) - 1
    assert PageMap.load(pm2).meta["pass"] == 2
    # the volume and the new map agree on every page
    new = open(path, "rb").read()
    r = PageMap.load(pm2).region("ram0")
    with open(vol, "rb") as v:
        for p in range(r.npages):
            if r.states[p] == PageState.REMOTE:
                v.seek(r.offsets[p])
                assert v.read(PS) == new[p * PS:(p + 1) * PS]


async def test_base_of_another_shape_is_refused(tmp_path, ram) -> None:
    path, _ = ram
    vol = str(tmp_path / "vol")
    await capture([("ram0", path)], vol, str(tmp_path / "pm1"), progress=False)
    other = str(tmp_path / "other.ram")
    make_ram(other, 8)
    with pytest.raises(CaptureError, match="has regions"):
        await capture([("ram0", other)], vol, str(tmp_path / "pm2"),
                      base=str(tmp_path / "pm1"), progress=False)
    with pytest.raises(CaptureError, match="does not use volume"):
        await capture([("ram0", path)], str(tmp_path / "vol2"), str(tmp_path / "pm2"),
                      base=str(tmp_path / "pm1"), progress=False)


def test_cli_errors_are_clear(tmp_path) -> None:
    res = memfs("capture", "--ram", str(tmp_path / "none"), "--volume", str(tmp_path / "v"),
                "--out", str(tmp_path / "pm"), check=False)
    assert res.returncode == 1 and "cannot read RAM" in res.stderr
    odd = tmp_path / "odd.ram"
    odd.write_bytes(b"x" * 100)
    res = memfs("capture", "--ram", str(odd), "--volume", str(tmp_path / "v"),
                "--out", str(tmp_path / "pm"), check=False)
    assert res.returncode == 1 and "not a positive multiple" in res.stderr
    res = memfs("capture", "--ram", str(odd), "--volume", "nbd+unix:///x",
                "--out", str(tmp_path / "pm"), check=False)
    assert res.returncode == 1


def test_cli_capture_json_and_two_regions(tmp_path) -> None:
    a, b = str(tmp_path / "a.ram"), str(tmp_path / "b.ram")
    make_ram(a, 16)
    make_ram(b, 300, seed=2)
    res = memfs("capture", "--ram", f"pc.ram={a}", "--ram", f"extra={b}",
                "--volume", str(tmp_path / "vol"), "--out", str(tmp_path / "pm"), "--json")
    assert '"pages_total": 316' in res.stdout
    pm = PageMap.load(tmp_path / "pm")
    assert [r.name for r in pm.regions] == ["pc.ram", "extra"]
    assert pm.region("extra").offsets[1] == (1 << 20) + PS  # second region at 1 MiB
    assert os.path.getsize(tmp_path / "vol") == (3 << 20) + 4096  # with its identity block
