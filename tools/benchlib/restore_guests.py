"""bench-restore's clones: QEMU's own restore's command line, the console
logs of the restore command's clones read as they grow, and when a clone's
ticks say it runs at full speed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import trio

from memfs.qemu.restore import CloneConfig


class FullConfig:
    """A clone's command line with anonymous RAM: QEMU's own restore."""

    def __init__(self, clone: CloneConfig) -> None:
        self.clone, self.name = clone, clone.name

    def argv(self, qmp_path: str) -> list[str]:
        argv = self.clone.argv(qmp_path)
        for i, a in enumerate(argv):
            if a.startswith("memory-backend-file") and "mem-path=" in a:
                props = [p for p in a.split(",")
                         if p.split("=")[0] in ("id", "size")]
                argv[i] = ",".join(["memory-backend-ram"] + props)
        return argv


NIC = ["-device", "pcie-root-port,id=rp0,chassis=1", "-netdev", "user,id=n0",
       "-device", "virtio-net-pci,netdev=n0,bus=rp0,id=net0,mac=52:54:00:12:34:56"]


class Tail:
    """A clone's console log (the restore command's chardev logfile), read as
    it grows: the host time each tick line arrived (tail_all polls every
    2 ms, one task for all clones: little CPU taken from the guests)."""

    def __init__(self, path: Path) -> None:
        self.path, self.ticks, self._buf, self._f = path, [], b"", None

    def poll(self, now: float) -> None:
        if self._f is None:
            try:
                self._f = open(self.path, "rb")
            except FileNotFoundError:
                return
        data = self._f.read()
        if data:
            *lines, self._buf = (self._buf + data).split(b"\n")
            self.ticks += [(now, 0) for ln in lines if ln.startswith(b"T ")]


async def tail_all(tails: list[Tail]) -> None:
    try:
        while True:
            now = time.monotonic()
            for tl in tails:
                tl.poll(now)
            await trio.sleep(0.002)
    finally:
        for tl in tails:
            if tl._f:
                tl._f.close()


def timings(vm: Any, t0: float, t_cont: float, tick_s: float) -> dict[str, float]:
    ticks = sorted(t for t, _ in vm.ticks if t >= t_cont)
    if len(ticks) < 12:
        return {"first_tick_s": round(ticks[0] - t0, 3) if ticks else -1.0,
                "full_speed_s": -1.0}
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    tail = [g for t, g in zip(ticks[1:], gaps) if t >= ticks[-1] - 3.0] or gaps[-10:]
    ok = 1.5 * max(statistics.median(tail), tick_s)
    full = next((ticks[i] for i in range(len(gaps) - 9)
                 if all(g <= ok for g in gaps[i:i + 10])), ticks[-1])
    return {"first_tick_s": round(ticks[0] - t0, 3), "full_speed_s": round(full - t0, 3),
            "median_gap_ms": round(statistics.median(tail) * 1000, 1)}
