"""The page map alone: round trips, validation, and fuzzed garbage."""

from __future__ import annotations

import os
import struct
from array import array

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs import msgfile
from memfs.pagemap import (FORMAT, PAGE_SIZE, ZERO_CHECKSUM, PageMap, PageMapError, PageState,
                           Region, checksum)


def sample_map() -> PageMap:
    pm = PageMap(disks=["/srv/vol", "nbd://127.0.0.1/x"])
    r = Region.empty("ram0", 16 * PAGE_SIZE)
    r.set_remote(1, 0, 4096, 111)
    r.set_remote(2, 1, 1 << 40, 2**64 - 1)
    pm.regions.append(r)
    pm.regions.append(Region.empty("ram1", PAGE_SIZE))
    return pm


def test_round_trip(tmp_path) -> None:
    pm = sample_map()
    path = tmp_path / "pm"
    pm.save(path)
    back = PageMap.load(path)
    assert back.disks == pm.disks
    r = back.region("ram0")
    assert r.state(0) == PageState.ZERO and r.checksums[0] == ZERO_CHECKSUM
    assert (r.state(2), r.disks[2], r.offsets[2], r.checksums[2]) == \
        (PageState.REMOTE, 1, 1 << 40, 2**64 - 1)
    assert back.counts() == {"pages_total": 17, "pages_zero": 15, "pages_remote": 2,
                             "pages_local": 0}
    assert back.dumps() == pm.dumps()


def test_empty_region_checksums_are_zero_page() -> None:
    r = Region.empty("r", 1000 * PAGE_SIZE)
    assert set(r.checksums) == {checksum(bytes(PAGE_SIZE))}


def doc() -> dict:
    return msgfile.loads_raw(FORMAT, sample_map().dumps())[0]


RAW = bytes(msgfile.loads_raw(FORMAT, sample_map().dumps())[1])  # ram0: 16 pages, ram1: 1


def pack(d: object, raw: bytes = RAW) -> bytes:
    """``d`` in a valid envelope: what the field checks see past the checksum."""
    return msgfile.dumps(FORMAT, [msgpack.packb(d)], [raw])


@pytest.mark.parametrize("raw, message", [
    (RAW[:-1], "the regions need 302 bytes of per-page arrays, the file holds 301"),
    (RAW + bytes(8), "the regions need 302 bytes of per-page arrays, the file holds 310"),
    (b"\x07" + RAW[1:], "region 'ram0': unknown page state"),
    (RAW[:16] + b"\x05" + RAW[17:], "region 'ram0': disk index out of range (have 2 disks)"),
])
def test_malformed_arrays_say_what_is_wrong(raw, message) -> None:
    with pytest.raises(PageMapError, match=f"^{message.replace('(', '.').replace(')', '.')}$"):
        PageMap.loads(pack(doc(), raw))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("regions"), "missing 'regions'"),
    (lambda d: d["regions"][0].update(size=4097), "not a positive multiple"),
    (lambda d: d["regions"][0].update(name="../etc"), "bad region name"),
    (lambda d: d["regions"][0].update(name=".memfs"), "bad region name"),
    (lambda d: d["regions"][1].update(name="ram0"), "duplicate region name"),
    (lambda d: d["regions"][0].update(page_size=3000), "bad page size"),
    (lambda d: d["regions"][0].update(size=2 * 4096),
     "the regions need 50 bytes of per-page arrays, the file holds 302"),
    (lambda d: d.update(disks=["/only-one"]), "disk index out of range"),
    (lambda d: d.update(disks=[]), "remote pages but no disks"),
    (lambda d: d.update(disks="x"), "'disks' should be list"),
    (lambda d: d["regions"][0].update(size=2**60), "too many pages"),
])
def test_malformed_maps_say_what_is_wrong(mutate, message) -> None:
    d = doc()
    mutate(d)
    with pytest.raises(PageMapError, match=message.replace("(", r"\(").replace(".", r"\.")):
        PageMap.loads(pack(d))


def test_missing_file_is_a_page_map_error(tmp_path) -> None:
    with pytest.raises(PageMapError, match="cannot read page map .*absent: No such file"):
        PageMap.load(tmp_path / "absent")


def test_envelope_magic_version_and_old_files() -> None:
    good = sample_map().dumps()
    with pytest.raises(PageMapError, match=r"^not a msgpack page map \(bad magic\)$"):
        PageMap.loads(b"MEMFS-TR" + good[8:])
    with pytest.raises(PageMapError, match=r"^unsupported page map version 99 \(this memfs "
                                           r"reads 2 and 3\)$"):
        PageMap.loads(good[:8] + (99).to_bytes(4, "little") + good[12:])
    v1 = msgpack.packb({"magic": "memfs-pagemap", "version": 1, **doc()})  # roughly v1
    with pytest.raises(PageMapError, match=r"^a version 1 page map \(no checksum\), written by "
                                           r"an older memfs: this memfs reads versions 2 and 3 only; "
                                           r"make it again$"):
        PageMap.loads(v1)
    with pytest.raises(PageMapError, match="truncated or has trailing bytes"):
        PageMap.loads(good + b"\0")


def field_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Where each part of a saved page map lies in the file: the header,
    the disks table, meta, and each per-page array of region ram0."""
    r = sample_map().regions[0]
    spans = {"magic": (0, 8), "version": (8, 12), "document length": (12, 16),
             "length": (16, 24), "document checksum": (24, 32), "checksum": (32, 48)}
    for name, raw in (("states", bytes(r.states)), ("offsets", r.offsets.tobytes()),
                      ("checksums", r.checksums.tobytes())):
        at = data.index(raw)
        spans[name] = (at, at + len(raw))
    at = data.index(b"\xa5disks")  # the first "disks" key: the disks table
    spans["disks table"] = (at, data.index(b"\xa4meta"))
    spans["meta"] = (data.index(b"\xa4meta"), data.index(b"\xa7regions"))
    at = spans["states"][1]  # the region's per-page disks follow its states
    spans["page disks"] = (at, at + r.npages)
    spans["region header"] = (data.index(b"\xa4name"), spans["states"][0])
    return spans


def test_a_single_bit_flip_anywhere_is_refused(tmp_path) -> None:
    """Every bit of every byte, in every field: header, disks table, meta,
    states, per-page disks, offsets, checksums.  One flip is never loaded."""
    pm = sample_map()
    pm.meta = {"volume": "/srv/vol", "created": 1.5}
    path = tmp_path / "pm"
    pm.save(path)
    good = path.read_bytes()
    spans = field_spans(good)
    assert len(spans) == 13 and all(a < b for a, b in spans.values()), spans
    refused = {name: 0 for name in spans}
    for pos in range(len(good)):
        for bit in range(8):
            bad = bytearray(good)
            bad[pos] ^= 1 << bit
            with pytest.raises(PageMapError) as e:
                PageMap.loads(bytes(bad))
            assert not str(e.value).startswith("region")  # caught before any field check
            for name, (a, b) in spans.items():
                refused[name] += a <= pos < b
    assert all(n >= 8 for n in refused.values()), refused
    # from a file: the error names it; a remote page made a zero page is refused
    bad = bytearray(good)
    bad[spans["states"][0] + 1] ^= PageState.REMOTE
    path.write_bytes(bad)
    with pytest.raises(PageMapError, match=f"^{path}: page map checksum mismatch: the file "
                                           "is corrupt$"):
        PageMap.load(path)


def test_saved_file_is_private_under_umask_0(tmp_path) -> None:
    old = os.umask(0)
    try:
        sample_map().save(tmp_path / "pm")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "pm").st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["pm"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_garbage_never_escapes_as_another_exception(data: bytes) -> None:
    try:
        PageMap.loads(data)
    except PageMapError:
        pass


VALID = sample_map().dumps()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(VALID) - 1))
def test_every_truncation_is_rejected(cut: int) -> None:
    with pytest.raises(PageMapError):
        PageMap.loads(VALID[:cut])


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(1, 255))
def test_changed_bytes_are_rejected(pos: int, xor: int) -> None:
    data = bytearray(VALID)
    data[pos] ^= xor
    with pytest.raises(PageMapError):
        PageMap.loads(bytes(data))


def test_lying_sizes_do_not_allocate() -> None:
    # a region of 2**32 pages (72 GiB of arrays) in a small, valid envelope
    head = msgpack.packb({"disks": [], "regions": [{"name": "r", "size": 1 << 44,
                                                     "page_size": 4096}]})
    with pytest.raises(PageMapError, match="the regions need 77309411328 bytes of per-page "
                                           "arrays, the file holds 0"):
        PageMap.loads(msgfile.dumps(FORMAT, [head]))
    # a bin32 header that claims 4 GiB, in a valid envelope
    lying = msgfile.dumps(FORMAT, [head[:-1] + b"\xc6\xff\xff\xff\xff"])
    with pytest.raises(PageMapError, match="not a msgpack page map"):
        PageMap.loads(lying)


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=12) | st.floats(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["disks", "meta", "regions"]), VALUES),
       st.lists(st.dictionaries(st.sampled_from(["name", "size", "page_size", "states",
                                                 "disks", "offsets", "checksums"]),
                                VALUES | st.integers(0, 1 << 20)), max_size=3))
def test_well_formed_envelope_odd_documents(top: dict, regions: list) -> None:
    """Past the checksum, a crafted document still meets the field checks."""
    top = dict(top)
    if regions:
        top["regions"] = regions
    try:
        pm = PageMap.loads(pack(top))
    except PageMapError:
        return
    for r in pm.regions:
        assert len(r.states) == len(r.disks) == len(r.offsets) == len(r.checksums) == r.npages


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.lists(st.tuples(st.sampled_from(list(PageState)), st.integers(0, 3)),
                                   min_size=1, max_size=200))
def test_tally_counts_pages_by_state_and_remote_ones_by_disk(ndisks: int, pages: list) -> None:
    """The counts a mount's gauges start from, with one disk (no per-disk
    split to make) and with several."""
    pages = [(s, d % ndisks) for s, d in pages]
    r = Region.empty("ram0", len(pages) * PAGE_SIZE)
    for p, (s, d) in enumerate(pages):
        if s == PageState.REMOTE:
            r.set_remote(p, d, p * PAGE_SIZE, 1)
        else:
            r.set_state(p, s)
    t = r.start_tally(ndisks)
    assert (t.zero, t.local) == (sum(s == PageState.ZERO for s, _ in pages),
                                 sum(s == PageState.LOCAL for s, _ in pages))
    assert t.remote[:ndisks] == [sum(s == PageState.REMOTE and d == k for s, d in pages)
                                 for k in range(ndisks)]
    assert t.remote_total == r.count(PageState.REMOTE)


def big_map(npages: int, odd: int | None = None) -> PageMap:
    """One region whose offsets span several of the loader's chunks; with
    ``odd``, that page's offset does not fit the compact form."""
    r = Region.empty("ram0", npages * PAGE_SIZE)
    r.states[1::2] = bytes([PageState.REMOTE]) * (npages // 2)
    r.offsets[1::2] = array("Q", range(PAGE_SIZE, npages * PAGE_SIZE, 2 * PAGE_SIZE))
    if odd is not None:
        r.offsets[odd] = (1 << 40) + 512
    r.checksums[1::2] = array("Q", range(npages // 2))
    return PageMap(disks=["/srv/vol"], regions=[r])


BIG = 3 * msgfile.SINK_CHUNK // 8 + 5  # pages: the offsets in four chunks, the last short

#: the format an older memfs wrote: every region's offsets as uint64s
V2 = msgfile.Format(FORMAT.magic, 2, FORMAT.what, FORMAT.error)


def v2_dumps(pm: PageMap) -> bytes:
    """``pm`` as a version 2 file: no ``offset_shift``, uint64 offsets."""
    d = {"disks": list(pm.disks), "meta": pm.meta,
         "regions": [{"name": r.name, "size": r.size, "page_size": r.page_size}
                     for r in pm.regions]}
    raw: list[bytes] = []
    for r in pm.regions:
        raw += [bytes(r.states), bytes(r.disks), bytes(r.offsets.le_bytes()),
                struct.pack(f"<{r.npages}Q", *r.checksums)]
    return msgfile.dumps(V2, [msgpack.packb(d, use_bin_type=True)], raw)


def test_version_3_keeps_packed_offsets_packed_and_reads_version_2() -> None:
    """A region whose offsets fit is 4 bytes a page smaller than in version
    2; one that does not fit is written as before; a version 2 file of the
    same map reads back equal, its offsets packed on the way in."""
    pm = sample_map()
    assert [r.offsets.compact for r in pm.regions] == [False, True]
    v3, v2 = pm.dumps(), v2_dumps(pm)
    tail3, tail2 = msgfile.loads_raw(FORMAT, v3)[1], msgfile.loads_raw(V2, v2)[1]
    assert len(tail2) - len(tail3) == 4 * pm.region("ram1").npages
    assert int.from_bytes(v3[8:12], "little") == 3 and int.from_bytes(v2[8:12], "little") == 2
    for blob in (v3, v2):
        back = PageMap.loads(blob)
        assert back.regions == pm.regions and back.disks == pm.disks
        assert [r.offsets.compact for r in back.regions] == [False, True]
    big = big_map(BIG)
    assert len(msgfile.loads_raw(V2, v2_dumps(big))[1]) == 18 * BIG
    assert len(msgfile.loads_raw(FORMAT, big.dumps())[1]) == 14 * BIG


@pytest.mark.parametrize("shift, message", [
    (4, "region #0: 'offset_shift' should be 0 or 8, not 4"),
    ("8", "region #0: 'offset_shift' should be int, not str"),
])
def test_a_bad_offset_shift_is_refused(shift, message) -> None:
    d = doc()
    d["regions"][0]["offset_shift"] = shift
    with pytest.raises(PageMapError, match=f"^{message}$"):
        PageMap.loads(pack(d))


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("odd", [None, 0, msgfile.SINK_CHUNK // 8, BIG - 1])
def test_a_map_loaded_from_a_file_packs_its_offsets(tmp_path, odd, version) -> None:
    """Version 3 reads packed offsets straight into place; version 2's
    uint64s are packed while they are read, unless one does not fit."""
    pm = big_map(BIG, odd)
    path = tmp_path / "pm"
    if version == 3:
        pm.save(path)
        assert path.read_bytes() == pm.dumps()
    else:
        path.write_bytes(v2_dumps(pm))
    back = PageMap.load(path).regions[0]
    assert back == pm.regions[0] and back.offsets.compact == (odd is None)
    assert PageMap.loads(path.read_bytes()).regions[0] == back


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 8 * BIG - 1), st.sampled_from([0, 1, 4, 5, 7]), st.integers(0, 7),
       st.sampled_from([2, 3]))
def test_a_flipped_offset_bit_in_a_file_is_refused(tmp_path_factory, page: int, byte: int,
                                                    bit: int, version: int) -> None:
    """Anywhere in the offsets, in every chunk, and (version 2) in the bytes
    that decide whether they stay compact: refused with the file's name,
    never loaded."""
    pm = big_map(BIG)
    offsets = pm.regions[0].offsets
    if version == 3:  # packed little-endian uint32s
        good = pm.dumps()
        at = good.index(struct.pack(f"<{BIG}I", *offsets.raw)) + 4 * (page % BIG) + byte % 4
    else:
        good = v2_dumps(pm)
        at = good.index(offsets.le_bytes()) + 8 * (page % BIG) + byte
    bad = bytearray(good)
    bad[at] ^= 1 << bit
    path = tmp_path_factory.mktemp("pm") / "pm"
    path.write_bytes(bad)
    with pytest.raises(PageMapError, match=f"^{path}: page map checksum mismatch: the file is "
                                           "corrupt$"):
        PageMap.load(path)


def test_load_and_save_hold_no_uint64_copy_of_the_offsets(tmp_path) -> None:
    """Python's allocations while a 1 Mi page map (4 GiB region) is loaded
    and saved: beyond the arrays loaded, less than the offsets' uint64 form
    (8 MiB) — they are packed and unpacked a piece at a time."""
    import tracemalloc
    pm = big_map(1 << 20)
    path = tmp_path / "pm"
    pm.save(path)
    tracemalloc.start()
    try:
        back = PageMap.load(path)
        kept, peak = tracemalloc.get_traced_memory()
        assert kept >= 14 << 20 and peak - kept < 2 << 20, (kept, peak)
        tracemalloc.reset_peak()
        back.save(path)
        now, peak = tracemalloc.get_traced_memory()
        assert peak - kept < 3 << 20, (kept, peak)  # the writer's 1 MiB buffer among them
    finally:
        tracemalloc.stop()
    assert back.regions[0].offsets.compact and back == pm
