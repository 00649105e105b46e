"""What a memfs mount says about itself (``.memfs/stats.json``) and what the
kernel's bdi says about it, as the benchmarks read them around a run."""

from __future__ import annotations

import json
import os
import time
from typing import Any

#: the daemon's counters of READs and fetches a touch run compares
READ_KEYS = ("reads", "bytes_read", "bytes_fetched", "fetch_requests")


def stats(mnt: str) -> dict[str, Any]:
    """The mount's ``.memfs/stats.json``."""
    with open(os.path.join(mnt, ".memfs", "stats.json")) as f:
        return json.load(f)


def stat_delta(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> dict[str, int]:
    """How much each of ``keys`` grew from snapshot ``a`` to ``b``."""
    return {k: b.get(k, 0) - a.get(k, 0) for k in keys}


def read_size(d: dict[str, int]) -> int:
    """Bytes per READ in a delta of READ_KEYS (0 without READs)."""
    return d["reads"] and d["bytes_read"] // d["reads"]


def hist_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The buckets of a latency histogram that grew, and by how much."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) - before.get(k, 0)}


def hist_p50_us(hist: dict[str, int]) -> str | None:
    """The daemon's log2 histogram: the bucket holding the median READ."""
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for lo in sorted(hist, key=int):
        seen += hist[lo]
        if seen * 2 >= total:
            return f"{lo}-{2 * int(lo)}"
    return None


def bdi_of(mnt: str) -> dict[str, Any]:
    """The mount's backing-device settings (read-ahead, dirty-page limits)."""
    st = os.stat(mnt)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    out: dict[str, Any] = {"bdi": dev}
    for k in ("read_ahead_kb", "max_ratio", "strict_limit"):
        try:
            with open(f"/sys/class/bdi/{dev}/{k}") as f:
                out[k] = int(f.read())
        except OSError:
            pass
    return out


def wait_prefetch(mnt: str, timeout: float) -> tuple[float, dict[str, Any]]:
    """Wait until the prefetcher has every page: (seconds waited, stats then)."""
    t0 = time.perf_counter()
    while True:
        s = stats(mnt)
        if s.get("prefetch_done"):
            return time.perf_counter() - t0, s
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"prefetch not done after {timeout}s: {s.get('pages_remote')} "
                               "pages remote")
        time.sleep(0.01)
