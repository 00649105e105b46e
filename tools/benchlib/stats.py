"""Percentiles, latency summaries and ratios of the benchmarks' samples."""

from __future__ import annotations


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank; 0.0 when empty)."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else 0.0


def lat(xs: list[float], with_max: bool = False) -> dict[str, float]:
    """Latencies in seconds as count, p50, p99 and mean (and ``with_max`` the
    largest) in microseconds."""
    us = [x * 1e6 for x in xs]
    out = {"n": len(us), "p50_us": round(pct(us, 0.5), 1), "p99_us": round(pct(us, 0.99), 1),
           "mean_us": round(sum(us) / max(1, len(us)), 1)}
    if with_max:
        out["max_us"] = round(max(us), 1) if us else 0.0
    return out


def ratio(a: float | None, b: float | None, places: int = 2) -> float | None:
    """a / b to ``places`` places, None when either is missing or zero."""
    return round(a / b, places) if a and b else None
