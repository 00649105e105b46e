"""tools/bench's rig: the captured RAM image on a volume, its page maps, a
tmpfs twin, and mounts of it measured between two stats snapshots."""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from memfs.pagemap import PageMap, PageState
from ramimage import mounted

from benchlib.host import drop_caches, say
from benchlib.maps import mapping
from benchlib.mountstats import READ_KEYS, bdi_of, hist_delta, hist_p50_us, stat_delta, stats
from benchlib.pyspy import profiled
from benchlib.ramfill import make_ram

PS = 4096
MIB = 1 << 20
log = functools.partial(say, "bench")


@dataclass
class Touched:
    """What a measured mount gave: the touching function's value, the
    daemon's stats before and after it, and the mount's bdi."""
    value: Any
    s0: dict[str, Any]
    s1: dict[str, Any]
    bdi: dict[str, Any]

    @property
    def delta(self) -> dict[str, int]:
        """READs and fetches the touches caused."""
        return stat_delta(self.s0, self.s1, READ_KEYS)

    def read_p50_bucket(self) -> str | None:
        """The daemon's histogram bucket holding the touches' median READ."""
        return hist_p50_us(hist_delta(self.s0["read_latency_us"], self.s1["read_latency_us"]))


def spread(pages: list[int], n: int, rng: random.Random, block: int = 16) -> list[int]:
    """``n`` random pages from ``pages``, no two in the same ``block``-page
    block (fault-around maps up to 16 cached neighbours: each touch then is a
    fault of its own)."""
    by_block: dict[int, int] = {}
    for p in rng.sample(pages, min(len(pages), n * 4)):
        by_block.setdefault(p // block, p)
        if len(by_block) >= n:
            break
    out = list(by_block.values())
    rng.shuffle(out)
    return out


class Rig:
    """The files of one run under ``work`` and mounts of them."""

    def __init__(self, a: argparse.Namespace, work: str) -> None:
        self.a = a
        self.work = work
        self.size = a.size_mib * MIB
        self.rng = random.Random(a.seed)
        self.ram = f"/dev/shm/memfs-bench-{os.getpid()}.ram"
        self.tmpfs_file = f"/dev/shm/memfs-bench-{os.getpid()}.tmpfs"
        self.vol = os.path.join(work, "vm.vol")
        self.pm_file = os.path.join(work, "vm.pagemap")
        self.mnt = os.path.join(work, "mnt")
        self.res: dict[str, Any] = {}
        self.region = "ram0"
        self.remote: list[int] = []

    def setup(self) -> None:
        """RAM image (ramfill's mix), captured to the volume; its remote
        pages; the tmpfs twin of figures 4 and 7."""
        t = time.perf_counter()
        make_ram(self.ram, self.size, self.a.seed)
        log(f"RAM image {self.a.size_mib} MiB in {time.perf_counter() - t:.1f}s; capturing")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "memfs.cli", "capture", "--ram", self.ram,
                            "--volume", self.vol, "--out", self.pm_file, "--no-progress",
                            "--json"], capture_output=True, text=True, check=True)
        cap = json.loads(r.stdout)
        os.unlink(self.ram)
        reg = PageMap.load(self.pm_file).regions[0]
        self.region = reg.name
        states = reg.states
        self.remote = [p for p in range(reg.npages) if states[p] == PageState.REMOTE]
        st = os.stat(self.vol)
        self.res["setup"] = {
            "region_bytes": self.size, "capture_seconds": round(time.perf_counter() - t, 2),
            "pages_total": reg.npages, "pages_remote": len(self.remote),
            "pages_zero": reg.count(PageState.ZERO), "volume": self.vol,
            "volume_bytes": st.st_size, "volume_allocated_bytes": st.st_blocks * 512,
            "capture": {k: cap.get(k) for k in ("pages_written", "bytes_written", "seconds")},
        }
        self.fresh_twin()

    def fresh_twin(self) -> None:
        """(Re)write the tmpfs twin of figures 4 and 7: write_bytes() bytes,
        every page present, and every page a new one.  Figure 4 calls it
        again after its last drop_caches: drop_caches cannot drop a tmpfs
        page (it is dirty) and sets PG_reclaim on it instead, which makes
        fault-around skip it (tools/probe-pushed-touch).  Written as a new
        file that then replaces the old: rewritten in place, the twin would
        get its own just-freed frames back in a scrambled order, and a
        fault-around window over scattered frames costs more (more
        struct-page cache misses); a new file's frames come from the free
        lists as they are, as the pushed pages' did."""
        new = self.tmpfs_file + ".new"
        with open(new, "wb") as f:
            chunk = os.urandom(MIB)
            for _ in range(self.write_bytes() // MIB):
                f.write(chunk)
        os.replace(new, self.tmpfs_file)

    def nbd_pagemap(self, uri: str) -> str:
        """The captured page map with its disk served at ``uri``."""
        pm = PageMap.load(self.pm_file)
        pm.disks = [uri]
        path = os.path.join(self.work, "vm-nbd.pagemap")
        pm.save(path)
        return path

    def write_bytes(self) -> int:
        return min(self.size, self.a.write_mib * MIB)

    @contextmanager
    def mount(self, pm: str, *extra: str) -> Iterator[int]:
        """A mount of ``pm`` with ``extra`` and every --mount-opt: its pid."""
        extra = (*extra, *self.a.mount_opt)
        with mounted(pm, self.mnt, *extra, log=os.path.join(self.work, "memfs.log")) as proc:
            yield proc.pid

    @property
    def path(self) -> str:
        return os.path.join(self.mnt, self.region)

    def touched(self, pm: str, extra: tuple[str, ...], advice: int | None,
                touch: Callable[[mmap.mmap], Any], prof: str | None = None,
                drop: bool = True) -> Touched:
        """Mount ``pm`` with ``extra``, map the region with ``advice``, drop
        the caches (with ``drop``) and run ``touch`` on the mapping between
        two stats snapshots, under py-spy with ``prof``."""
        with self.mount(pm, *extra) as pid:
            m = mapping(self.path, self.size, advice=advice)
            if drop:
                drop_caches()
            s0 = stats(self.mnt)
            with profiled(pid, prof):
                value = touch(m)
            s1 = stats(self.mnt)
            m.close()
            bdi = bdi_of(self.mnt)
        return Touched(value, s0, s1, bdi)

    def cleanup(self) -> None:
        for p in (self.ram, self.tmpfs_file, self.tmpfs_file + ".new"):
            if os.path.exists(p):
                os.unlink(p)
