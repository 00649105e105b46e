"""Per-page offsets kept as uint32 << 8 when they fit (memfs.pagemap.offsets):
every value comes back exactly, whatever its size and alignment; a value
that does not fit widens the array instead of being lost; the page map file
is byte for byte what the uint64 array wrote."""

from __future__ import annotations

import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.pagemap import PAGE_SIZE, PageMap, Region
from memfs.pagemap.offsets import _CHUNK, LIMIT, Offsets, Packer

U64 = (1 << 64) - 1

#: offsets of every size and alignment: multiples of 1..64 KiB alignments up
#: to the top of uint64, with the edges of the compact form among them
ALIGNED = st.builds(lambda align, k: min(U64, (k * align)), st.sampled_from(
    [1, 2, 8, 255, 256, 512, 4096, 1 << 16]), st.integers(0, U64 >> 8))
EDGES = st.sampled_from([0, 256, 4096, LIMIT - 256, LIMIT - 1, LIMIT, LIMIT + 256,
                         (1 << 63), U64, U64 - 255, 1, 255, 257])
VALUE = st.one_of(ALIGNED, EDGES, st.integers(0, 1 << 40).map(lambda v: v & ~0xFFF))


def fits(v: int) -> bool:
    return v % 256 == 0 and v < LIMIT


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUE, max_size=300))
def test_every_value_comes_back_and_packs_only_when_all_fit(values: list[int]) -> None:
    o = Offsets.of(values)
    assert list(o) == values and len(o) == len(values)
    assert [o[i] for i in range(len(values))] == values
    assert o.compact == all(fits(v) for v in values)
    assert o.wide() == array("Q", values)
    assert bytes(o.le_bytes()) == struct.pack(f"<{len(values)}Q", *values)
    assert o.tobytes() == array("Q", values).tobytes()
    back = Offsets.from_le(bytes(o.le_bytes()))
    assert back == o and back.compact == o.compact and back == array("Q", values)
    assert Offsets.of(array("Q", values)) == o and o.copy() == o
    assert b"".join(o.le_chunks()) == bytes(o.le_bytes())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 1 << 20).map(lambda k: k * 4096), min_size=1, max_size=64),
       st.lists(st.tuples(st.integers(0, 63), VALUE), max_size=20))
def test_assignment_widens_instead_of_losing_a_value(start: list[int],
                                                       sets: list[tuple[int, int]]) -> None:
    o, model = Offsets.of(start), list(start)
    assert o.compact
    for i, v in sets:
        i %= len(model)
        o[i] = v
        model[i] = v
        assert o[i] == v
    assert list(o) == model
    if not all(fits(v) for _, v in sets):
        assert not o.compact  # widened on the first value that did not fit, and stays so
    else:
        assert o.compact


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUE, min_size=1, max_size=80), st.lists(VALUE, max_size=80),
       st.integers(-90, 90), st.integers(-90, 90), st.sampled_from([None, 1, 2, 3, -1]),
       st.sampled_from(["offsets", "array", "list"]), st.booleans())
def test_slices_read_and_assign_like_the_array(values: list[int], other: list[int], a: int,
                                               b: int, step: int | None, kind: str,
                                               wide: bool) -> None:
    o = Offsets(array("Q", values)) if wide else Offsets.of(values)
    s = slice(a, b, step)
    got = o[s]
    assert isinstance(got, Offsets) and list(got) == values[s]
    want = list(values)
    n = len(want[s])
    src = (other * (n // max(1, len(other)) + 1))[:n] if step not in (None, 1) else other
    if step not in (None, 1) and len(src) != n:
        return  # an extended slice takes exactly its length (other is empty)
    given_ = {"offsets": Offsets.of(src), "array": array("Q", src), "list": src}[kind]
    want[s] = src
    o[s] = given_
    assert list(o) == want
    assert o == array("Q", want)


def test_values_no_uint64_holds_are_refused_and_change_nothing() -> None:
    o = Offsets.of([4096, 8192])
    for bad in (-1, -4096, 1 << 64):
        with pytest.raises(OverflowError):
            o[0] = bad
    assert o.compact and list(o) == [4096, 8192]
    with pytest.raises(OverflowError):
        Offsets.of([4096, -1])
    with pytest.raises(IndexError):
        o[2] = 4096
    with pytest.raises(IndexError):
        o[2] = 1 << 50  # would widen: refused first
    with pytest.raises(IndexError):
        o[2]
    assert o.compact and list(o) == [4096, 8192]


@pytest.mark.parametrize("n", [1, _CHUNK - 1, _CHUNK, _CHUNK + 1, 2 * _CHUNK + 3])
@pytest.mark.parametrize("where", ["none", "first", "last", "middle"])
@pytest.mark.parametrize("bad", [LIMIT, 4096 + 512, (1 << 63) + 4096])
def test_one_value_that_does_not_fit_anywhere_keeps_uint64(n: int, where: str, bad: int) -> None:
    """Around the packing's chunk edges: a single odd value in any chunk is seen."""
    values = array("Q", range(0, n * PAGE_SIZE, PAGE_SIZE))
    at = {"none": None, "first": 0, "last": n - 1, "middle": min(n - 1, _CHUNK)}[where]
    if at is not None:
        values[at] = bad
    o = Offsets.from_le(values.tobytes())
    assert o.compact == (at is None or fits(bad))
    assert o == values and o.wide() == values and bytes(o.le_bytes()) == values.tobytes()


@settings(max_examples=100, deadline=None)
@given(st.lists(VALUE, min_size=1, max_size=40))
def test_the_page_map_file_holds_the_offsets_as_memory_does(tmp_path_factory,
                                                            values: list[int]) -> None:
    """Packed offsets are written packed (uint32 ``offset >> 8``), the others
    as little-endian uint64s; either file reads back to the same values, and
    a uint64 file whose values all fit reads back packed."""
    n = len(values)
    states, disks, sums = bytearray([1]) * n, bytearray(n), array("Q", range(n))
    packed = Region("ram0", n * PAGE_SIZE, PAGE_SIZE, states, disks, array("Q", values), sums)
    plain = Region("ram0", n * PAGE_SIZE, PAGE_SIZE, bytearray(states), bytearray(disks),
                   Offsets(array("Q", values)), array("Q", sums))
    fit = all(fits(v) for v in values)
    assert packed.offsets.compact == fit and not plain.offsets.compact
    blob = PageMap(disks=["/v"], regions=[packed]).dumps()
    wide = PageMap(disks=["/v"], regions=[plain]).dumps()
    assert struct.pack(f"<{n}Q", *values) in wide
    if fit:
        assert struct.pack(f"<{n}I", *(v >> 8 for v in values)) in blob
        assert len(wide) - len(blob) == 4 * n  # offset_shift 8 and 0 take a byte each
    else:
        assert blob == wide
    path = tmp_path_factory.mktemp("pm") / "pm"
    PageMap(disks=["/v"], regions=[packed]).save(path)
    for back in (PageMap.load(path).regions[0], PageMap.loads(blob).regions[0],
                 PageMap.loads(wide).regions[0]):
        assert list(back.offsets) == values and back == packed == plain
        assert back.offsets.compact == fit


def test_region_setters_keep_every_offset() -> None:
    r = Region.empty("ram0", 8 * PAGE_SIZE)
    assert r.offsets.compact and list(r.offsets) == [0] * 8
    r.set_remote(1, 0, 5 * PAGE_SIZE, 7)
    assert r.offsets.compact and r.offsets[1] == 5 * PAGE_SIZE
    r.set_remote(2, 0, (1 << 40) + 512, 8)  # 1 TiB and more: widened, exact
    r.set_remote(3, 0, 4096 + 1, 9)
    assert not r.offsets.compact
    assert list(r.offsets) == [0, 5 * PAGE_SIZE, (1 << 40) + 512, 4097, 0, 0, 0, 0]
    r.set_zero(2)
    assert r.offsets[2] == 0 and r.offsets[1] == 5 * PAGE_SIZE


def packed_in_pieces(values: list[int], cuts: list[int]) -> Offsets:
    """``values`` through a Packer, handed their file bytes cut at ``cuts``
    (entry indexes), as a page map file is while it is read."""
    data = struct.pack(f"<{len(values)}Q", *values)
    p = Packer(len(values))
    assert p.nbytes == len(data)
    at = 0
    for cut in sorted({c % (len(values) + 1) for c in cuts} | {len(values)}):
        p.write(bytearray(data[8 * at:8 * cut]))
        at = cut
    return p.result()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3 * _CHUNK), st.integers(1, 1 << 28),
       st.lists(st.integers(0, 3 * _CHUNK), max_size=6),
       st.lists(st.tuples(st.integers(0, 3 * _CHUNK), EDGES | VALUE), max_size=3))
def test_packed_while_read_in_any_pieces(n: int, step: int, cuts: list[int],
                                         odd: list[tuple[int, int]]) -> None:
    """Any cut of the file's bytes packs to what the whole array packs to; a
    value that does not fit in any piece (the first, a middle or the last)
    turns the array into uint64s with every earlier value kept."""
    values = [(i * step % (1 << 28)) * PAGE_SIZE for i in range(n)]  # up to 1 TiB - 4 KiB
    for i, v in odd:
        values[i % len(values)] = v
    o = packed_in_pieces(values, cuts)
    assert o.compact == all(fits(v) for v in values)
    assert list(o) == values and o == Offsets.of(values)
    assert b"".join(o.le_chunks()) == struct.pack(f"<{len(values)}Q", *values)


@pytest.mark.parametrize("n", [1, _CHUNK, 2 * _CHUNK + 3])
@pytest.mark.parametrize("at", ["first", "last"])
def test_a_widening_piece_keeps_what_was_packed_before(n: int, at: str) -> None:
    values = list(range(0, 3 * n * PAGE_SIZE, PAGE_SIZE))
    i = {"first": 0, "last": len(values) - 1}[at]
    values[i] = LIMIT + 256
    o = packed_in_pieces(values, [n, 2 * n])  # the odd value in the first or the last piece
    assert not o.compact and list(o) == values


def test_a_packer_refuses_broken_pieces_and_an_early_result() -> None:
    p = Packer(3)
    with pytest.raises(ValueError, match=r"^offsets: a chunk of whole uint64s within the "
                                         r"array expected$"):
        p.write(bytes(7))
    p.write(struct.pack("<2Q", 4096, 8192))
    with pytest.raises(ValueError, match=r"^offsets: 2 of 3 values written$"):
        p.result()
    with pytest.raises(ValueError, match="within the array"):
        p.write(bytes(16))  # one more than the array holds
    p.write(memoryview(struct.pack("<Q", 1 << 20)))
    assert list(p.result()) == [4096, 8192, 1 << 20]
