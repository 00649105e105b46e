"""memfs.served.ServedPages alone: which pages the kernel was handed."""

from __future__ import annotations

from memfs.served import ServedPages


def test_each_page_counts_once_and_runs_say_which() -> None:
    s = ServedPages()
    s.add_region("ram0", 100)
    s.add_region("ram1", 10)
    s.mark("ram0", 10, 12)
    s.mark("ram0", 11, 14)            # overlaps: 12 and 13 are new
    s.mark("ram0", 60, 61)
    s.mark("ram1", 0, 10)
    assert s.count("ram0") == 5 and s.count("ram1") == 10 and s.count() == 15
    assert list(s.runs("ram0")) == [(10, 14), (60, 61)]
    assert list(s.runs("ram1")) == [(0, 10)]
