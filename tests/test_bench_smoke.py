"""tools/bench, tools/bench-pagemap and tools/bench-fuse-floor run end to end
and report every figure;
tools/benchlib's reader of py-spy profiles takes any raw profile.

No timing assertions: targets live in the benchmarks' own output (DESIGN.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from benchlib.pyspy import IDLE_LEAVES, summarize_profile  # noqa: E402

FIGURES = ("f1", "f2", "f3", "f4", "f5", "f6", "f7_default", "f7_bdi50", "f7_tmpfs")


@pytest.mark.slow
def test_bench_quick_reports_every_figure(needs_fuse) -> None:
    if not shutil.which("qemu-nbd"):
        pytest.skip("needs qemu-nbd")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench"), "--quick"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert set(res["kinds"]) == {"file", "nbd"}
    for kind, k in res["kinds"].items():
        for fig in FIGURES:
            assert fig in k, f"{kind}: {fig} missing"
        assert k["f1"]["memfs"]["n"] > 0 and k["f1"]["raw"]["n"] > 0
        assert k["f1"]["read_size"] == 4096  # read-ahead 0: one page per READ
        assert k["f3"]["raw_mib_s"] > 0 and k["f3"]["rows"]
        assert k["f5"]["pages_remote"] == 0
        # figure 5's floor: its own raw reads, right before and after its mount
        before, after = k["f5"]["raw_mib_s_before_after"]
        assert before > 0 and after > 0 and k["f5"]["raw_method"]
        assert k["f5"]["raw_seconds"] > 0
        # nothing the bench does drops the pushed pages before figure 4 touches them
        # (a raw read's drop_caches once did: every "hit" was a READ)
        assert k["f4"]["drop_caches_since_mount"] == 0
        assert k["f6"]["ra0"]["bytes_fetched"] > 0
    figures = {row["figure"] for row in res["summary"]}
    assert figures == {"f1_p50", "f1_p99", "f2_p50", "f3_seq", "f4_p50", "f5_complete",
                       "f6_amp", "f7_write"}
    assert all(row["verdict"] in ("pass", "MISS", "-") for row in res["summary"])
    assert "memfs" in r.stderr  # the table


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_bench_fuse_floor_small(tmp_path) -> None:
    """The C and Python floor daemons build, mount, answer every touch with
    the right bytes (the bench checks them and exits non-zero otherwise) and
    leave nothing mounted."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench-fuse-floor"),
                        "--samples", "20", "--rounds", "1", "--size-mib", "4",
                        "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(r.stdout)["rounds"]
    for v in ("raw", "raw_after", "c-null", "c-disk", "py-null", "py-disk"):
        assert row[v]["n"] == 20, v
    assert set(row["ratio_p50"]) == {"c-null", "c-disk", "py-null", "py-disk"}
    assert list(tmp_path.iterdir()) == []
    assert str(tmp_path) not in open("/proc/mounts").read()


@pytest.mark.slow
@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_bench_pagemap_small() -> None:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench-pagemap"),
                        "--pages", "65536", "--repeat", "1", "--mount", "--faults", "20",
                        "--snapshots", "20"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["pages"] == 65536 and res["save_fsync"]["min_s"] >= 0
    assert res["load_hot"]["median_s"] >= 0
    # the faults read real bytes that verify (a wrong one would be SIGBUS in the child)
    sm = res["stats_through_mount"]
    assert sm["fault_4k"]["n"] == 20 and sm["fault_4k_small"]["n"] == 20
    assert sm["daemon_rss_bytes"] > 0
    assert res["fault_4k_p50_over_1gib"] == round(
        sm["fault_4k"]["p50_us"] / sm["fault_4k_small"]["p50_us"], 3)


_FRAME = st.sampled_from(["run (memfs/fs.py:10)", "fetch (memfs/fetcher.py:99)",
                          "read (/x/memfs/disks/file.py:3)", "f (lib.py:1)",
                          f"{IDLE_LEAVES[0]} (trio/_epoll.py:5)",
                          f"{IDLE_LEAVES[1]} (trio/_thread.py:7)"])
_THREAD = st.sampled_from(["<module> (memfs/cli.py:1)", "Thread._bootstrap (threading.py:9)"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_THREAD, st.lists(_FRAME, min_size=1, max_size=6),
                          st.integers(1, 1000)), max_size=20),
       st.lists(st.text(max_size=30), max_size=3))
def test_profile_summary_counts_every_sample_once(tmp_path_factory, stacks, junk) -> None:
    """Every sample of a raw profile lands in one thread-and-state share;
    lines that are no stack ("junk") are passed over; an empty profile says so."""
    path = tmp_path_factory.mktemp("prof") / "p.raw"
    lines = [f"{';'.join([thread, *frames])} {n}" for thread, frames, n in stacks]
    path.write_text("\n".join(lines + [j.replace("\n", "") + " x" for j in junk]) + "\n")
    s = summarize_profile(str(path))
    total = sum(n for _, _, n in stacks)
    if not total:
        assert s == {"samples": 0}
        return
    assert s["samples"] == total
    assert abs(sum(s["split_pct"].values()) - 100) < 0.1 * len(s["split_pct"])
    busy = sum(n for _, frames, n in stacks if not frames[-1].startswith(IDLE_LEAVES))
    shares = s["loop_self"] + s["workers_self"]
    assert all("/" not in name for name, _ in shares)  # paths cut to the file name
    assert sum(v for _, v in shares) <= 100.0 * busy / total + 0.1 * len(shares)
    if busy == total:
        assert not any(k.endswith("_idle") for k in s["split_pct"])


def test_profile_summary_of_a_missing_file(tmp_path) -> None:
    assert summarize_profile(str(tmp_path / "none.raw")) == \
        {"error": f"no profile at {tmp_path / 'none.raw'}"}
