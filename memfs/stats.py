"""Counters and the READ latency histogram behind ``.memfs/`` and ``memfs stats``."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

#: histogram buckets: bucket i counts READs that took [2**i, 2**(i+1)) µs
HIST_BUCKETS = 32

COUNTERS = (
    "reads", "writes", "faults", "pages_fetched", "bytes_fetched", "bytes_read",
    "bytes_written", "fetch_requests", "checksum_failures", "fetch_errors",
    "fetch_retries", "read_errors", "pages_failed", "reads_waited_for_pagemap",
    "pages_prefetched", "pages_pushed", "push_errors",
    "sync_pages", "sync_bytes",
)


class Stats:
    """Plain counters bumped by the fetcher and the filesystem.

    Gauges (pages_remote, …) are computed on demand by ``gauges`` callbacks,
    so that nothing is counted twice and the files are always current.
    """

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.read_latency_us = [0] * HIST_BUCKETS
        self.started = time.time()
        self.gauges: list[Callable[[], dict[str, Any]]] = []

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def record_read(self, seconds: float) -> None:
        us = max(1, int(seconds * 1e6))
        self.read_latency_us[min(us.bit_length() - 1, HIST_BUCKETS - 1)] += 1

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for g in self.gauges:
            out.update(g())
        out.update(self.counters)
        out["uptime_s"] = round(time.time() - self.started, 3)
        out["read_latency_us"] = {f"{1 << i}": n for i, n in enumerate(self.read_latency_us) if n}
        return out


def histogram_text(hist: dict[str, int]) -> str:
    """One line per non-empty bucket: lower bound in µs, count, a bar."""
    if not hist:
        return "(no reads yet)\n"
    peak = max(hist.values())
    lines = []
    for lo, n in sorted(hist.items(), key=lambda kv: int(kv[0])):
        bar = "#" * max(1, round(40 * n / peak))
        lines.append(f"{_us(int(lo)):>8} .. {_us(2 * int(lo)):>8}  {n:>10}  {bar}")
    return "\n".join(lines) + "\n"


def _us(us: int) -> str:
    if us >= 1_000_000:
        return f"{us // 1_000_000}s"
    if us >= 1000:
        return f"{us // 1000}ms"
    return f"{us}us"


def file_text(snapshot: dict[str, Any], name: str) -> str:
    """The content of one ``.memfs/`` stats file."""
    if name == "stats.json":
        return json.dumps(snapshot, indent=1, sort_keys=True) + "\n"
    if name == "read_latency_us":
        return histogram_text(snapshot["read_latency_us"])
    return f"{snapshot[name]}\n"
