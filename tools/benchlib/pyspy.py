"""py-spy profiles of a memfs daemon during a measurement, and where their
samples go (tools/bench --profile)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from typing import Any, Iterator

from benchlib.boot import REPO

PY_SPY = str(REPO / ".venv" / "bin" / "py-spy")
#: a stack ending here is a thread waiting, not working
IDLE_LEAVES = ("EpollIOManager.get_events", "WorkerThread._work")
#: frames of memfs, pyfuse3 and the NBD client a loop stack is counted under
OURS = ("pages.py", "fetcher.py", "fs.py", "store.py", "nbd", "_pyfuse3", "file.py", "pagemap/")


@contextmanager
def profiled(pid: int, out: str | None) -> Iterator[None]:
    """py-spy records ``pid`` into ``out`` (raw stacks) while the body runs;
    nothing without ``out``."""
    if not out:
        yield
        return
    p = subprocess.Popen([PY_SPY, "record", "-p", str(pid), "-f", "raw", "-o", out,
                          "-r", "1000", "--nonblocking"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.7)  # attached
    try:
        yield
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _Tally:
    """Samples of one profile, by thread, idle or busy, and frame."""

    def __init__(self) -> None:
        self.leaf: dict[str, collections.Counter[str]] = {"loop": collections.Counter(),
                                                          "workers": collections.Counter()}
        self.incl: collections.Counter[str] = collections.Counter()
        self.parts: collections.Counter[str] = collections.Counter()
        self.total = 0

    def add(self, line: str) -> None:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            return
        count = int(n)
        frames = [_short(fr) for fr in stack.split(";")]
        self.total += count
        thread = "workers" if frames[0].startswith("Thread._bootstrap") else "loop"
        idle = frames[-1].startswith(IDLE_LEAVES)
        self.parts[f"{thread}_{'idle' if idle else 'busy'}"] += count
        if idle:
            return
        self.leaf[thread][frames[-1]] += count
        if thread == "loop":
            for fr in set(frames[3:]):
                if any(x in fr for x in OURS):
                    self.incl[fr] += count

    def share(self, c: collections.Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100 * v / self.total, 1)) for name, v in c.most_common(k)]


def summarize_profile(path: str, top: int = 12) -> dict[str, Any]:
    """Raw (collapsed) stacks -> where the daemon's samples go.

    Samples are split by thread: ``loop`` (the trio thread running pyfuse3
    and memfs) and ``workers`` (trio.to_thread: disk preads, store writes).
    Idle samples (epoll wait, a worker waiting for a job) are counted apart;
    the shares are of all samples.  ``loop_inclusive``: memfs, pyfuse3 and
    NBD frames on the busy loop thread, counting every frame of a stack."""
    t = _Tally()
    try:
        f = open(path)
    except OSError:
        return {"error": f"no profile at {path}"}
    with f:
        for line in f:
            t.add(line)
    if not t.total:
        return {"samples": 0}
    return {"samples": t.total,
            "split_pct": {k: round(100 * v / t.total, 1) for k, v in sorted(t.parts.items())},
            "loop_self": t.share(t.leaf["loop"], top),
            "workers_self": t.share(t.leaf["workers"], top),
            "loop_inclusive": t.share(t.incl, top)}


def _short(frame: str) -> str:
    """'fn (path/to/mod.py:123)' -> 'fn (mod.py:123)'."""
    name, sep, rest = frame.partition(" (")
    if not sep:
        return frame
    return f"{name} ({os.path.basename(rest.rstrip(')'))})"
