"""Text for people: sizes, the ``memfs stats`` table, one-line errors."""

from __future__ import annotations

import os
from typing import Any

from .stats import histogram_text

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64M``, ``1G``, ``2GiB`` -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        n = float(t[:-1] if unit else t)
    except ValueError:
        raise ValueError(f"bad size {text!r}") from None
    return int(n * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_SECTIONS = (
    ("pages", ("pages_total", "pages_zero", "pages_remote", "pages_local", "pages_served",
               "pagemap_installed")),
    ("requests", ("reads", "writes", "faults", "bytes_read", "bytes_written",
                  "reads_waited_for_pagemap")),
    ("fetches", ("fetch_requests", "pages_fetched", "pages_fetched_demand",
                 "pages_fetched_prefetch", "pages_joined", "pages_held_hits", "bytes_fetched",
                 "bytes_bridged", "fetch_retries", "fetch_errors", "checksum_failures",
                 "pages_failed", "read_errors", "reads_failed_fast", "direct_readahead_bytes",
                 "direct_readahead_hits")),
    ("prefetch", ("pages_prefetched", "pages_pushed", "pages_push_held_hits", "push_errors",
                  "prefetch_done", "prefetch_seconds")),
    ("source", ("pages_dirty", "pages_written_back", "sync_pages", "sync_bytes",
                "pages_on_volume", "pages_on_disks")),
)


def render_stats(snap: dict[str, Any]) -> str:
    """A table of every counter, grouped, with sizes made readable."""
    lines = []
    shown: set[str] = set()
    for title, keys in _SECTIONS:
        rows = [(k, snap[k]) for k in keys if k in snap]
        if not rows:
            continue
        lines.append(f"{title}:")
        for k, v in rows:
            shown.add(k)
            extra = f"  ({human_bytes(v)})" if k.startswith("bytes") and v else ""
            if k == "pages_remote" and snap.get("pages_total"):
                extra = f"  ({100 * v / snap['pages_total']:.1f}% still only on disk)"
            lines.append(f"  {k:<26} {v:>14}{extra}")
    rest = [(k, v) for k, v in sorted(snap.items())
            if k not in shown and not isinstance(v, dict)]
    if rest:
        lines.append("other:")
        lines.extend(f"  {k:<26} {v:>14}" for k, v in rest)
    lines.append("READ latency (µs):")
    lines.extend("  " + ln for ln in histogram_text(snap.get("read_latency_us", {})).splitlines())
    return "\n".join(lines)


# -- errors ----------------------------------------------------------------------

def unwrap(e: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups (trio's
    nurseries wrap what a task raised); a group of several stays a group."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def is_expected(e: BaseException) -> bool:
    """An error the operator can fix (a file, a server, the disk, an option),
    as opposed to a bug: OSError, and every layer's own error type."""
    if isinstance(e, OSError):
        return True
    return isinstance(e, Exception) and type(e).__module__.split(".")[0] == "memfs"


def error_line(e: BaseException) -> str:
    """``memfs: <what is wrong, which file or URI>`` without the prefix: one
    line, whatever the message held."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
        if e.filename is not None:
            names = os.fsdecode(e.filename)
            if e.filename2 is not None:
                names += f" -> {os.fsdecode(e.filename2)}"
            text = f"{names}: {text}"
    else:
        text = str(e) or type(e).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
