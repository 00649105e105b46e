"""tools/bench and tools/bench-pagemap run end to end and report every figure.

No timing assertions: targets live in the benchmarks' own output (DESIGN.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow]

FIGURES = ("f1", "f2", "f3", "f4", "f5", "f6", "f7_default", "f7_bdi50", "f7_tmpfs")


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
        assert k["f6"]["ra0"]["bytes_fetched"] > 0
    figures = {row["figure"] for row in res["summary"]}
    assert figures == {"f1_p50", "f1_p99", "f2_p50", "f3_seq", "f4_p50", "f5_complete",
                       "f6_amp", "f7_write"}
    assert all(row["verdict"] in ("pass", "MISS", "-") for row in res["summary"])
    assert "memfs" in r.stderr  # the table


def test_bench_pagemap_small() -> None:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench-pagemap"),
                        "--pages", "65536", "--repeat", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["pages"] == 65536 and res["save_fsync"]["min_s"] >= 0
    assert res["load_hot"]["median_s"] >= 0
