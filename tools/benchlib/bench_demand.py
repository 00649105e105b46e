"""tools/bench's demand figures (prefetch off): 1 random 4 KiB faults, 2
MADV_HUGEPAGE faults, 3 sequential first touch, 6 bytes fetched per byte
touched; each beside the raw read of the same disk."""

from __future__ import annotations

import mmap
import time
from typing import Any

from benchlib import rawdisk
from benchlib.bench_rig import MIB, PS, Rig, spread
from benchlib.host import drop_caches
from benchlib.maps import touch_timed
from benchlib.mountstats import read_size
from benchlib.stats import lat, ratio


class DemandFigures(Rig):
    def fig1(self, kind: str, pm: str, target: str, prof: str | None = None) -> dict[str, Any]:
        """4 KiB random first touches, read-ahead 0, MADV_RANDOM."""
        n = self.a.samples
        pages = spread(self.remote, 2 * n, self.rng)
        raw_pages, fs_pages = pages[:n], pages[n:]
        drop_caches()
        offs = [p * PS for p in raw_pages]
        raw, how = rawdisk.lat(kind, target, offs, PS)
        buffered = None
        if kind == "file":
            drop_caches()
            buffered = lat(rawdisk.file_buffered_lat(target, offs[::-1], PS), with_max=True)
        t = self.touched(pm, ("--no-prefetch", "--read-ahead-kb", "0"), mmap.MADV_RANDOM,
                         lambda m: touch_timed(m, [p * PS for p in fs_pages]), prof)
        d = t.delta
        out = {"memfs": lat(t.value, with_max=True), "raw": lat(raw, with_max=True),
               "raw_method": how, "daemon_reads": d, "read_size": read_size(d),
               "daemon_read_p50_bucket_us": t.read_p50_bucket(), "bdi": t.bdi}
        if buffered:
            out["raw_buffered_after_drop_caches"] = buffered
        out["ratio_p50"] = ratio(out["memfs"]["p50_us"], out["raw"]["p50_us"], 3)
        out["ratio_p99"] = ratio(out["memfs"]["p99_us"], out["raw"]["p99_us"], 3)
        return out

    def fig2(self, kind: str, pm: str, target: str, prof: str | None = None) -> dict[str, Any]:
        """MADV_HUGEPAGE mapping: one touch per random 4 MiB chunk."""
        chunk = 4 * MIB
        nchunks = self.size // chunk
        n = min(self.a.huge_samples, max(1, nchunks // 2))
        chunks = self.rng.sample(range(nchunks), min(nchunks, 2 * n))
        raw_chunks, fs_chunks = chunks[:n], chunks[n:] or chunks[:n]
        offs = [c * chunk + self.rng.randrange(4) * MIB for c in raw_chunks]
        drop_caches()
        raw, how = rawdisk.lat(kind, target, offs, MIB)
        t = self.touched(pm, ("--no-prefetch",), mmap.MADV_HUGEPAGE,
                         lambda m: touch_timed(m, [c * chunk for c in fs_chunks]), prof)
        d = t.delta
        out = {"memfs": lat(t.value, with_max=True), "raw": lat(raw, with_max=True),
               "raw_method": how, "touches": len(fs_chunks), "daemon_reads": d,
               "read_size": read_size(d),
               "bytes_read_per_touch": d["bytes_read"] // max(1, len(fs_chunks)),
               "daemon_read_p50_bucket_us": t.read_p50_bucket(), "bdi": t.bdi}
        out["ratio_p50"] = ratio(out["memfs"]["p50_us"], out["raw"]["p50_us"], 3)
        # the kernel asks for more than 1 MiB per touch: the raw read of as many
        # bytes (one request) is the fairer floor for the touch itself
        per = out["bytes_read_per_touch"] // MIB * MIB
        if per > MIB and not prof:
            drop_caches()
            same, _ = rawdisk.lat(kind, target, [c * chunk for c in raw_chunks], per)
            out["raw_same_bytes"] = {"bytes": per, **lat(same, with_max=True)}
            out["ratio_p50_same_bytes"] = ratio(out["memfs"]["p50_us"],
                                                out["raw_same_bytes"]["p50_us"], 3)
        return out

    def seq_touch(self, pm: str, extra: tuple[str, ...], advice: int | None,
                  prof: str | None = None) -> dict[str, Any]:
        """One read per page of the whole region, in order: MiB/s."""
        def every_page(m: mmap.mmap) -> float:
            t = time.perf_counter()
            for off in range(0, self.size, PS):
                m[off]
            return time.perf_counter() - t
        t = self.touched(pm, ("--no-prefetch", *extra), advice, every_page, prof)
        d = t.delta
        return {"seconds": round(t.value, 3), "mib_s": round(self.size / t.value / MIB, 1),
                "daemon_reads": d, "read_size": read_size(d), "bdi": t.bdi}

    def fig3(self, kind: str, pm: str, target: str) -> dict[str, Any]:
        """Sequential first touch at each read-ahead and with MADV_HUGEPAGE."""
        raw, how = rawdisk.seq(kind, target, self.size)
        rows = {}
        for ra in self.a.read_ahead:
            rows[f"ra{ra}"] = self.seq_touch(pm, ("--read-ahead-kb", str(ra)), None)
        rows["hugepage"] = self.seq_touch(pm, (), mmap.MADV_HUGEPAGE)
        for row in rows.values():
            row["ratio"] = ratio(row["mib_s"], raw / MIB, 3)
        best = max(rows, key=lambda k: rows[k]["mib_s"])
        return {"raw_mib_s": round(raw / MIB, 1), "raw_method": how, "rows": rows,
                "best": best, "ratio": rows[best]["ratio"]}

    def fig6(self, pm: str) -> dict[str, Any]:
        """Random 4 KiB touches on a plain mapping: fetched / touched."""
        rows: dict[str, Any] = {}
        settings: list[tuple[str, tuple[str, ...], int | None]] = [("default", (), None)]
        settings += [(f"ra{ra}", ("--read-ahead-kb", str(ra)), None)
                     for ra in [0, *self.a.read_ahead]]
        settings.append(("hugepage_default", (), mmap.MADV_HUGEPAGE))
        for name, extra, advice in settings:
            pages = spread(self.remote, self.a.amp_samples, self.rng)
            t = self.touched(pm, ("--no-prefetch", *extra), advice,
                             lambda m: touch_timed(m, [p * PS for p in pages]), drop=False)
            d = t.delta
            touched = len(pages) * PS
            rows[name] = {"touches": len(pages), "bytes_touched": touched, **d,
                          "read_ahead_kb": t.bdi.get("read_ahead_kb"),
                          "amplification": round(d["bytes_fetched"] / touched, 2),
                          "read_amplification": round(d["bytes_read"] / touched, 2)}
        return rows
