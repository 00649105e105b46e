"""bench-restore's clones: QEMU's own restore's command line, the console
logs of the restore command's clones read as they grow, when a clone's
ticks say it runs at full speed, and a restore command run and timed
against them."""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

import trio

from memfs import control
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


def restore_options(a: argparse.Namespace, trace: bool) -> list[str]:
    """What the bench's own options add to a ``memfs restore`` command, the
    one command's and the pool's alike: no trace, the MACs kept, and
    --restore-args as they were given."""
    return (([] if trace else ["--no-trace"]) + (["--keep-mac"] if a.keep_mac else [])
            + shlex.split(a.restore_args or ""))


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


async def until_complete(mnt: Path) -> None:
    """Until the mount's background completion is done (a restore host's
    steady state: the whole snapshot in the page cache)."""
    with trio.fail_after(600):
        while control.read_stats(mnt).get("pages_remote", 1):
            await trio.sleep(0.1)


async def run_timed(what: str, cmd: list[str], tails: list[Tail], seconds: float,
                    tick_s: float) -> tuple[float, float, dict[str, Any], list[dict[str, float]]]:
    """Run a restore command (JSON on stdout) while its clones' consoles are
    read, then let them run ``seconds``: when it started and ended, its
    report, and each clone's timings."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tail_all, tails)
        t0 = time.monotonic()
        res = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                     check=False)
        t_end = time.monotonic()
        if res.returncode:
            raise RuntimeError(f"{what}: {res.stderr.decode()}")
        rep = json.loads(res.stdout)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    per = [timings(tl, t0, c["t_cont"], tick_s) for tl, c in zip(tails, rep["clones"])]
    return t0, t_end, rep, per


def command_times(rep: dict[str, Any], t0: float, per: list[dict[str, float]],
                  marks: list[tuple[str, float]]) -> dict[str, Any]:
    """The command's clock ``marks`` (step name, host time it ended) as
    seconds each from ``t0``, then the first tick; first tick, full speed
    and the load of the slowest clone."""
    first = max(p["first_tick_s"] for p in per)
    steps, prev = {}, t0
    for name, at in [*marks, ("first tick", t0 + first)]:
        steps[name] = round(at - prev, 3)
        prev = at
    return {"resumed_s": round(rep["t"]["resumed"] - t0, 3), "first_tick_s": first,
            "full_speed_s": max(p["full_speed_s"] for p in per), "steps": steps,
            "load_s": max(c["load_s"] for c in rep["clones"])}
