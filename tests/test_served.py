"""memfs.served.ServedPages alone: the one owner of DESIGN.md invariant 3
(the races themselves are in test_invariants)."""

from __future__ import annotations

import pytest

from memfs.served import ServedPages


def test_pushes_side_by_side_and_what_counts_as_a_race() -> None:
    s = ServedPages()
    s.add_region("ram0", 100)
    assert s.mark("ram0", 10, 12) is None                # no push in flight
    with s.pushing("ram0", 0, 50), s.pushing("ram0", 50, 100):  # two batches at once
        assert not s.take_for_push("ram0", 10)            # a READ had it
        assert s.take_for_push("ram0", 20) and s.take_for_push("ram0", 60)
        assert not s.take_for_push("ram0", 20)            # never pushed twice
        assert s.mark("ram0", 30, 40) is None             # inside a claim, none pushed
        assert s.mark("ram0", 19, 22) == (0, 50)          # a page the push took
    assert s.mark("ram0", 60, 61) is None                 # the push is over
    assert s.count("ram0") == s.count() == 2 + 2 + 10 + 2  # each page once
    assert list(s.runs("ram0")) == [(10, 12), (19, 22), (30, 40), (60, 61)]
    with pytest.raises(RuntimeError, match="outside every claimed push"):
        s.take_for_push("ram0", 70)
