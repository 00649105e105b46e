"""The page map alone: round trips, validation, and fuzzed garbage."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs.pagemap import (MAGIC, PAGE_SIZE, ZERO_CHECKSUM, PageMap, PageMapError, PageState,
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
    return msgpack.unpackb(sample_map().dumps())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(magic="nope"), "bad magic"),
    (lambda d: d.update(version=99), "unsupported page map version 99"),
    (lambda d: d.pop("regions"), "missing 'regions'"),
    (lambda d: d["regions"][0].update(size=4097), "not a positive multiple"),
    (lambda d: d["regions"][0].update(name="../etc"), "bad region name"),
    (lambda d: d["regions"][0].update(name=".memfs"), "bad region name"),
    (lambda d: d["regions"][1].update(name="ram0"), "duplicate region name"),
    (lambda d: d["regions"][0].update(page_size=3000), "bad page size"),
    (lambda d: d["regions"][0].update(states=b"\x00" * 15), "'states' holds 15 bytes"),
    (lambda d: d["regions"][0].update(offsets=b"\x00" * 8), "'offsets' holds 8 bytes"),
    (lambda d: d["regions"][0].update(states=b"\x07" * 16), "unknown page state"),
    (lambda d: d.update(disks=["/only-one"]), "disk index out of range"),
    (lambda d: d.update(disks=[]), "remote pages but no disks"),
    (lambda d: d.update(disks="x"), "'disks' should be list"),
    (lambda d: d["regions"][0].update(size=2**60), "too many pages"),
])
def test_malformed_maps_say_what_is_wrong(mutate, message) -> None:
    d = doc()
    mutate(d)
    with pytest.raises(PageMapError, match=message.replace("(", r"\(").replace(".", r"\.")):
        PageMap.loads(msgpack.packb(d))


def test_missing_file_is_a_page_map_error(tmp_path) -> None:
    with pytest.raises(PageMapError, match="cannot read page map"):
        PageMap.load(tmp_path / "absent")


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
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255))
def test_flipped_bytes_are_rejected_or_still_consistent(pos: int, value: int) -> None:
    data = bytearray(VALID)
    data[pos] = value
    try:
        pm = PageMap.loads(bytes(data))
    except PageMapError:
        return
    for r in pm.regions:  # whatever loaded is internally consistent
        assert len(r.states) == len(r.disks) == len(r.offsets) == len(r.checksums) == r.npages
        assert all(s in (0, 1, 2) for s in r.states)


def test_lying_length_does_not_allocate() -> None:
    # a bin32 header that claims 4 GiB of states
    head = msgpack.packb({"magic": MAGIC, "version": 1, "disks": [], "regions": [{"name": "r"}]})
    lying = head[:-1] + b"\xc6\xff\xff\xff\xff"
    with pytest.raises(PageMapError):
        PageMap.loads(lying)
