"""tools/bench's verdicts and report: the issue's targets, one summary row
per figure and disk, the table, and which memfs was measured."""

from __future__ import annotations

import hashlib
import subprocess
from typing import Any

from benchlib.boot import REPO
from benchlib.stats import ratio

# The targets: (kind, limit); kind says how the ratio is compared.
TARGETS = {
    "f1_p50": ("ratio<=", 1.5), "f1_p99": ("ratio<=", 3.0), "f2_p50": ("ratio<=", 1.3),
    "f3_seq": ("ratio>=", 0.9), "f4_p50": ("ratio<=", 1.2), "f5_complete": ("ratio<=", 1.2),
    "f6_amp": ("abs<=", 1.5), "f7_write": ("ratio>=", 0.9),
}

Row = tuple[str, str, str, Any, Any, Any]  # figure, disk, what, memfs, raw, ratio


def verdict(key: str, value: float | None) -> str:
    """pass or MISS against the target of figure ``key``; - without a value."""
    if value is None:
        return "-"
    kind, lim = TARGETS[key]
    ok = value <= lim if kind.endswith("<=") else value >= lim
    return "pass" if ok else "MISS"


def target_text(key: str) -> str:
    kind, lim = TARGETS[key]
    op = "<=" if kind.endswith("<=") else ">="
    if kind == "abs_us<=":
        return f"p50 {op} {lim:g} us"
    if kind == "abs<=":
        return f"{op} {lim:g}"
    return f"{op} {lim:g}x raw"


def provenance() -> dict[str, Any]:
    """Which memfs was measured: HEAD and whether memfs/ had local changes."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return r.stdout.strip()
    return {"head": git("rev-parse", "--short", "HEAD"),
            "memfs_modified": [ln.split()[-1] for ln in
                               git("status", "--porcelain", "--", "memfs").splitlines()],
            "memfs_diff_sha1": hashlib.sha1(git("diff", "HEAD", "--", "memfs").encode())
            .hexdigest()[:12]}


def _demand_rows(kind: str, k: dict[str, Any]) -> list[Row]:
    """Figures 1 to 3: first touches against raw reads."""
    f1, f2, f3 = k["f1"], k["f2"], k["f3"]
    rows: list[Row] = [
        ("f1_p50", kind, "1 demand fault 4K p50 (us)", f1["memfs"]["p50_us"],
         f1["raw"]["p50_us"], f1["ratio_p50"]),
        ("f1_p99", kind, "1 demand fault 4K p99 (us)", f1["memfs"]["p99_us"],
         f1["raw"]["p99_us"], f1["ratio_p99"]),
        ("f2_p50", kind, "2 hugepage fault p50 (us) vs 1M read",
         f2["memfs"]["p50_us"], f2["raw"]["p50_us"], f2["ratio_p50"])]
    if "raw_same_bytes" in f2:
        rows.append(("f2_p50", kind, f"2 hugepage fault p50 (us) vs "
                     f"{f2['raw_same_bytes']['bytes'] >> 20}M read", f2["memfs"]["p50_us"],
                     f2["raw_same_bytes"]["p50_us"], f2["ratio_p50_same_bytes"]))
    for name, row in f3["rows"].items():
        rows.append(("f3_seq", kind, f"3 seq first touch {name} (MiB/s)", row["mib_s"],
                     f3["raw_mib_s"], row["ratio"]))
    return rows


def _ptes(f4: dict[str, Any]) -> str:
    """Figure 4's PTEs mapped per touch, memfs/tmpfs: equal when like for like."""
    lay = f4.get("layout")
    if not lay:
        return ""
    text = f"; fig4 PTEs mapped per touch {lay['memfs']['ptes_per_touch']:g} memfs, " \
        f"{lay['tmpfs']['ptes_per_touch']:g} tmpfs"
    gone = f4.get("pages_not_cached_before_touch")
    if gone:
        text += f" (NOT a hit: {gone} pushed pages had left the page cache, " \
            f"{f4.get('drop_caches_since_mount')} drop_caches since the mount)"
    return text


def _local_rows(kind: str, k: dict[str, Any]) -> list[Row]:
    """Figures 4 to 7: pushed pages, completion, amplification, writes."""
    rows: list[Row] = [
        ("f4_p50", kind, "4 pushed-page first touch p50 (us) vs tmpfs",
         k["f4"]["memfs"]["p50_us"], k["f4"]["tmpfs_hit"]["p50_us"],
         ratio(k["f4"]["memfs"]["p50_us"], k["f4"]["tmpfs_hit"]["p50_us"], 3)),
        ("f5_complete", kind, "5 all pages local (s)",
         k["f5"]["prefetch_seconds"], k["f5"]["raw_seconds"], k["f5"]["ratio"])]
    for name, row in k["f6"].items():
        rows.append(("f6_amp", kind, f"6 fetched/touched {name} (ra {row['read_ahead_kb']})",
                     row["amplification"], None, None))
    for key, label in (("f7_default", "default bdi"), ("f7_bdi50", "bdi 50/0")):
        for style in ("byte_per_page", "memset"):
            r = k[key][style]
            rows.append(("f7_write", kind, f"7 write {style} {label} (MiB/s)", r["mib_s"],
                         k["f7_tmpfs"][style]["mib_s"], r["ratio"]))
            tm = k["f7_tmpfs"][style]["mib_s_dirtying_only"]
            rows.append(("f7_write", kind, "7   same, dirtying only (no msync)",
                         r["mib_s_dirtying_only"], tm, ratio(r["mib_s_dirtying_only"], tm, 3)))
    return rows


def summary(kinds: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure and disk: value, raw baseline, ratio, target, verdict."""
    out = []
    for kind, k in kinds.items():
        for key, disk, label, value, raw, rat in _demand_rows(kind, k) + _local_rows(kind, k):
            judged = value if TARGETS[key][0].startswith("abs") else rat
            out.append({"figure": key, "disk": disk, "what": label, "memfs": value, "raw": raw,
                        "ratio": rat, "target": target_text(key),
                        "verdict": verdict(key, judged)})
    return out


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def table(res: dict[str, Any]) -> str:
    """The summary as text, with how each raw figure was read and the profiles."""
    s = res["setup"]
    lines = [f"tools/bench: {s['region_bytes'] >> 20} MiB region ({s['pages_remote']} remote, "
             f"{s['pages_zero']} zero pages), {res['machine']['cpus']} cpus, kernel "
             f"{res['machine']['kernel']}, {res['seconds']} s, memfs at {res['code']['head']}"
             + (" + local changes" if res["code"]["memfs_modified"] else ""),
             "raw = the same disk read directly in the same run (fig 7: tmpfs mapping); "
             "verdicts informational",
             f"{'disk':<5} {'figure':<46} {'memfs':>10} {'raw':>10} {'ratio':>7}  "
             f"{'target':<16} {'':4}"]
    for r in res["summary"]:
        lines.append(f"{r['disk']:<5} {r['what']:<46} {_num(r['memfs']):>10} "
                     f"{_num(r['raw']):>10} {_num(r['ratio']):>7}  {r['target']:<16} "
                     f"{r['verdict']}")
    for kind, k in res["kinds"].items():
        lines.append(f"{kind}: raw 4K = {k['f1']['raw_method']}; READ size fig1 "
                     f"{k['f1']['read_size']} B, fig2 {k['f2']['read_size']} B "
                     f"({k['f2']['bytes_read_per_touch'] >> 10} KiB per touch); fig3 raw = "
                     f"{k['f3']['raw_method']}{_ptes(k['f4'])}")
        for fig, p in k.get("profile", {}).items():
            summ = p["summary"]
            lines.append(f"{kind} profile {fig} ({summ.get('samples')} samples): "
                         f"{summ.get('split_pct')}")
            for part in ("loop_self", "workers_self"):
                top = ", ".join(f"{n} {v}%" for n, v in summ.get(part, [])[:5])
                lines.append(f"    {part}: {top}")
    return "\n".join(lines)
