"""ServedPages keeps a bit per page (issue 11: a 64 GiB region's served set
in 2 MiB): against a byte per page, for marks of every length and alignment,
overlapping, at the region's end and past it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.pagemap import runs
from memfs.served import ServedPages


@st.composite
def marks(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    npages = draw(st.integers(1, 300))
    first = st.integers(0, npages + 3)
    ranges = draw(st.lists(st.tuples(first, st.integers(0, 70)).map(
        lambda t: (t[0], t[0] + t[1])), max_size=30))
    return npages, ranges


@settings(max_examples=400, deadline=None)
@given(marks())
def test_bits_agree_with_a_byte_per_page(case: tuple[int, list[tuple[int, int]]]) -> None:
    npages, ranges = case
    s = ServedPages()
    s.add_region("ram0", npages)
    s.add_region("ram1", 9)
    model = bytearray(npages)
    for first, end in ranges:
        s.mark("ram0", first, end)
        model[first:min(end, npages)] = b"\1" * max(0, min(end, npages) - first)
        assert s.count("ram0") == model.count(1)
    assert s.pages("ram0") == model
    assert list(s.runs("ram0")) == list(runs(model))
    assert s.count("ram1") == 0 and list(s.runs("ram1")) == [] and s.count() == model.count(1)


def test_a_64_gib_region_costs_a_bit_per_page() -> None:
    s = ServedPages()
    n = 16 << 20
    s.add_region("ram0", n)
    assert len(s._bits["ram0"]) == n // 8
    s.mark("ram0", 0, n)
    s.mark("ram0", n - 1, n + 5)
    assert s.count("ram0") == n and list(s.runs("ram0")) == [(0, n)]
