"""tools/bench's figures once pages are local (prefetch on): 5 time until
every page is local, 4 first touch of a pushed page, 7 writes into a fetched
mapping; beside a tmpfs file's page-cache hits and writes."""

from __future__ import annotations

import ctypes
import mmap
import random
import struct
import time
from typing import Any

from benchlib import rawdisk
from benchlib.bench_rig import MIB, PS, Rig, spread
from benchlib.host import drop_caches
from benchlib.maps import mapping, touch_timed
from benchlib.mountstats import bdi_of, stat_delta, stats, wait_prefetch
from benchlib.stats import lat, ratio

_libc = ctypes.CDLL(None, use_errno=True)


def write_pass(m: mmap.mmap, w: int, style: str) -> dict[str, Any]:
    """One byte per page, or whole MiBs (memset), into ``m``, then msync."""
    val = random.randrange(1, 255)
    t = time.perf_counter()
    if style == "byte_per_page":
        for off in range(0, w, PS):
            m[off] = val
    else:
        fill = bytes([val]) * MIB
        for off in range(0, w, MIB):
            m[off:off + MIB] = fill
    t_write = time.perf_counter() - t
    m.flush()  # msync(MS_SYNC)
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 3), "write_seconds": round(t_write, 3),
            "msync_seconds": round(dt - t_write, 3), "mib_s": round(w / dt / MIB, 1),
            "mib_s_dirtying_only": round(w / max(t_write, 1e-9) / MIB, 1)}


def _base(path: str) -> int:
    """Start address of this process's mapping of ``path``."""
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(path):
                return int(line.split("-", 1)[0], 16)
    raise LookupError(path)


def pfn_runs(path: str, offsets: list[int], window: int = 16) -> dict[str, Any]:
    """How this process's mapping of ``path`` lies in physical memory around
    each of ``offsets``: the PTEs mapped in its fault-around window, and the
    runs of consecutive frame numbers among them (1: contiguous)."""
    base = _base(path)
    runs: list[int] = []
    mapped = 0
    with open("/proc/self/pagemap", "rb") as pm:
        for off in offsets:
            pm.seek((base + off) // PS // window * window * 8)
            pfns = [e & ((1 << 55) - 1) for e in struct.unpack(f"{window}Q", pm.read(8 * window))
                    if e >> 63]
            mapped += len(pfns)
            runs.append(1 + sum(1 for x, y in zip(pfns, pfns[1:]) if y != x + 1))
    n = max(1, len(runs))
    return {"runs_mean": round(sum(runs) / n, 2), "ptes_per_touch": round(mapped / n, 1),
            "contiguous": sum(1 for r in runs if r == 1)}


def not_cached(path: str, offsets: list[int]) -> int:
    """How many pages of this process's mapping of ``path`` at ``offsets``
    are not in the page cache (mincore): a touch of one is a READ, not a hit."""
    base = _base(path)
    vec = ctypes.c_ubyte()
    gone = 0
    for off in offsets:
        if _libc.mincore(ctypes.c_void_p(base + off), ctypes.c_size_t(PS), ctypes.byref(vec)):
            raise OSError(ctypes.get_errno(), "mincore")
        gone += not vec.value & 1
    return gone


def drops() -> int:
    """drop_caches so far on this host (/proc/vmstat drop_pagecache): the
    bench lock keeps others' from a run, when they take it."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1])
    return 0


class LocalFigures(Rig):
    def fig5_4_7(self, kind: str, pm: str, target: str) -> dict[str, Any]:
        """One mount with prefetch: time to complete (5), then touches of
        pushed pages (4), then writes into the fetched mapping (7, default
        bdi); a second mount for figure 7 with relaxed bdi limits.

        Figure 5's raw read is taken right before that mount and right
        after it (after figures 4 and 7: a raw read drops the caches, and
        figure 4 touches the pages the completion pushed), and their mean is
        the floor: this host's disk drifts from minute to minute (a 1 GiB
        read took 1.0 to 2.9 s within 20 minutes, measured), and figure 3's
        raw read, a minute earlier, made the ratio swing by as much."""
        out: dict[str, Any] = {}
        before, how = rawdisk.seq(kind, target, self.size)
        drop_caches()
        d0 = drops()
        t_mount = time.perf_counter()
        with self.mount(pm):
            t_up = time.perf_counter()
            wall, s = wait_prefetch(self.mnt, timeout=600)
            total = time.perf_counter() - t_mount
            out["f5"] = {"prefetch_seconds": s.get("prefetch_seconds"),
                         "seconds_from_mount_ready": round(wall, 3),
                         "seconds_from_mount_start": round(total, 3),
                         "mount_seconds": round(t_up - t_mount, 3),
                         "raw_method": how, "pages_remote": s.get("pages_remote"),
                         "pages_pushed": s.get("pages_pushed"),
                         "bytes_fetched": s.get("bytes_fetched"),
                         "push_errors": s.get("push_errors")}
            out["f4"] = self.fig4(s, d0)
            out["f7_default"] = self.writes()
        after, _ = rawdisk.seq(kind, target, self.size)
        ideal = self.size / ((before + after) / 2)
        out["f5"]["raw_seconds"] = round(ideal, 3)
        out["f5"]["raw_mib_s_before_after"] = [round(before / MIB, 1), round(after / MIB, 1)]
        out["f5"]["ratio"] = ratio(s.get("prefetch_seconds") or wall, ideal, 3)
        with self.mount(pm, "--bdi-max-ratio", "50", "--bdi-strict-limit", "0"):
            wait_prefetch(self.mnt, timeout=600)
            out["f7_bdi50"] = self.writes()
        return out

    def fig4(self, s: dict[str, Any], d0: int) -> dict[str, Any]:
        """First touches of pushed pages (the mount is complete), and the
        same touches of a tmpfs file whose pages are all present: what a
        page-cache hit costs on this machine.

        Like for like, the tmpfs twin is written afresh here, as the pushed
        pages were filled after the last drop_caches: neither file's pages
        have been through drop_caches.  A twin written at setup had: every
        drop_caches sets PG_reclaim on the dirty tmpfs pages it cannot drop
        (lru_deactivate_file), PG_reclaim is PG_readahead, and fault-around
        skips such a folio, so each tmpfs touch mapped one PTE through
        shmem_fault while each memfs touch mapped its 16 cached neighbours:
        figure 4 read 1.3-1.7x where a fresh twin reads 0.9-1.2x
        (tools/probe-pushed-touch, one run: memfs 4.5 us, twin after a
        drop 3.2 us, fresh twin 3.9 us).  ``layout`` shows, per side, the
        PTEs each touch mapped (``like_for_like``: equal) and how scattered
        the frames of each fault-around window are (runs_mean: 1 is
        contiguous), which is what is left of the difference.

        Both files are touched at the same offsets, one touch of each in
        turn (which goes first alternates): each touch of one file has the
        same page-table layout, free-page lists and host load as its twin
        of the other.  (Touched one file after the other at the same
        offsets, the second ran up to ~10 % faster: 5.4 against 5.0 us,
        measured.)"""
        w = self.write_bytes()
        self.fresh_twin()
        pages = spread([p for p in self.remote if p < w // PS], self.a.samples, self.rng)
        offsets = [p * PS for p in pages]
        m = mapping(self.path, self.size)
        tm = mapping(self.tmpfs_file, w)
        evicted = not_cached(self.path, offsets)
        s0 = stats(self.mnt)
        hits: list[float] = []
        tmpfs: list[float] = []
        for i, off in enumerate(offsets):
            for mm, out in ((m, hits), (tm, tmpfs)) if i % 2 else ((tm, tmpfs), (m, hits)):
                out.extend(touch_timed(mm, [off]))
        s1 = stats(self.mnt)
        layout = {"memfs": pfn_runs(self.path, offsets),
                  "tmpfs": pfn_runs(self.tmpfs_file, offsets)}
        m.close()
        tm.close()
        return {"memfs": lat(hits, with_max=True), "tmpfs_hit": lat(tmpfs, with_max=True),
                "layout": layout, "like_for_like": layout["memfs"]["ptes_per_touch"]
                == layout["tmpfs"]["ptes_per_touch"],
                "reads_during_touches": s1["reads"] - s0["reads"],
                # either makes the run no measure of a hit
                "pages_not_cached_before_touch": evicted,
                "drop_caches_since_mount": drops() - d0,
                "pages_pushed": s.get("pages_pushed"),
                "order": "interleaved, same offsets; tmpfs twin written after the last drop"}

    def writes(self) -> dict[str, Any]:
        """Write 1 byte per page, then memset whole pages, each + msync."""
        w = self.write_bytes()
        out: dict[str, Any] = {"bytes": w, "bdi": bdi_of(self.mnt)}
        s0 = stats(self.mnt)
        m = mapping(self.path, self.size, write=True)
        for style in ("byte_per_page", "memset"):
            out[style] = write_pass(m, w, style)
        m.close()
        s1 = stats(self.mnt)
        out["daemon"] = stat_delta(s0, s1, ("writes", "bytes_written"))
        out["write_size"] = out["daemon"]["writes"] and \
            out["daemon"]["bytes_written"] // out["daemon"]["writes"]
        return out

    def tmpfs_writes(self) -> dict[str, Any]:
        """The same writes into the tmpfs twin: figure 7's baseline."""
        w = self.write_bytes()
        m = mapping(self.tmpfs_file, w, write=True)
        out: dict[str, Any] = {"bytes": w}
        for style in ("byte_per_page", "memset"):
            out[style] = write_pass(m, w, style)
        m.close()
        return out
