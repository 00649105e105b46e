"""This host's caches and a process's memory, as the benchmarks measure them."""

from __future__ import annotations

import os
import sys
import time


def say(who: str, msg: str) -> None:
    """A timestamped progress line on stderr (stdout carries the JSON)."""
    print(f"[{who} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    """Write back and drop the page cache: the next run starts cold."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def anon_in_mapping(pid: int, path: str) -> int:
    """Bytes of ``pid``'s private (copied-on-write) pages in its mapping of ``path``."""
    total, inside = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    inside = line.rstrip().endswith(path)
                elif inside and first == "Anonymous:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total
