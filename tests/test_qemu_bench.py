"""tools/bench-migrate runs its QEMU baselines end to end (small guest).

Why: the benchmark is how memfs is compared with QEMU's own migrations; it
must not rot between the runs that produce the published table. Timings are
not checked here, only that each method migrated the guest intact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memfs.qemu import qemu_binary

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_bench_migrate_baselines(tmp_path: Path) -> None:
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    out = tmp_path / "bench.json"
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / "bench-migrate"), "--fill", "16",
             "--only", "precopy,postcopy", "--settle", "1", "--after", "1",
             "--timeout", "60", "--json", str(out)],
            capture_output=True, text=True, timeout=240)
        # QEMU 7.2's own pre-copy under TCG now and then resumes the guest with
        # stale pages (its kernel then oopses: docs/ceph.rst on pre-copy under
        # TCG); the bench names that case.  It is QEMU's, not the bench's:
        # one more run, and any other failure fails at once.
        if proc.returncode == 0 or "did not answer 'sum after'" not in proc.stdout:
            break
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    for method in ("precopy", "postcopy"):
        r = results[method]
        assert r["ok"] is True, r
        assert r["src_bytes"] > 16 << 20, r          # the RAM went through the stream
        assert r["src_free_s"] is not None and r["stall_ms"] > 0, r
    assert "precopy" in proc.stdout and "stall_ms" in proc.stdout
