"""What a region costs the host in memory: the page cache of every file that
holds its pages (region, store, volume) plus the daemon's resident set.

Why: guest RAM on memfs must sit in host memory once.  The region file's page
cache is the guest's RAM; a store or volume file that also stays in the page
cache would hold it a second time.  Benchmarks and tests report this figure
beside the region's size (target: at most 1.05 times).

Run from outside the daemon (a benchmark, a test): opening a region file from
the daemon's own loop would deadlock.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterable

from .prefetch import Residency

PAGE = 4096


def cached_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of ``path`` in the page cache (cachestat(2); 0 if it is gone)."""
    try:
        r = Residency(os.fspath(path))
    except OSError:
        return 0
    try:
        return r.cached(0, 0) * PAGE  # length 0: to the end of the file
    finally:
        r.close()


def rss_bytes(pid: int) -> int:
    """Resident set of process ``pid`` (VmRSS), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class HostMemory:
    region_bytes: int
    files: dict[str, int] = field(default_factory=dict)
    daemon_rss: int = 0

    @property
    def total(self) -> int:
        return sum(self.files.values()) + self.daemon_rss

    @property
    def ratio(self) -> float:
        return round(self.total / self.region_bytes, 3)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "total": self.total, "ratio": self.ratio}


def measure(mountpoint: str | os.PathLike[str], region: str,
            others: Iterable[str | os.PathLike[str]] = ()) -> HostMemory:
    """Host memory for ``region`` of the mount: its page cache, that of the
    ``others`` (store files, a file volume) and the daemon's RSS."""
    mnt = os.fspath(mountpoint)
    path = os.path.join(mnt, region)
    hm = HostMemory(os.stat(path).st_size)
    hm.files[path] = cached_bytes(path)
    for p in others:
        if os.path.isfile(p):
            hm.files[os.fspath(p)] = cached_bytes(p)
    with open(os.path.join(mnt, ".memfs", "pid")) as f:
        hm.daemon_rss = rss_bytes(int(f.read()))
    return hm
