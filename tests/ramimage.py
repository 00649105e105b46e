"""Test RAM images and real memfs mounts, shared by the test modules."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from memfs.mounttable import mounts_at

PS = 4096
MEMFS = [sys.executable, "-m", "memfs.cli"]
#: every daemon started by ``mounted`` (its log, its process): conftest's
#: daemon_log_check fails a test whose daemon logged or exited unexpectedly
DAEMONS: list[tuple[str, subprocess.Popen]] = []


def make_ram(path: str, npages: int, seed: int = 1) -> bytes:
    """Zero pages, one repeated page, and random pages, in a fixed mix."""
    rnd = random.Random(seed)
    rep = rnd.randbytes(PS)
    pages = []
    for i in range(npages):
        k = i % 8
        if k in (0, 5):
            pages.append(bytes(PS))
        elif k == 3:
            pages.append(rep)
        else:
            pages.append(rnd.randbytes(PS))
    data = b"".join(pages)
    with open(path, "wb") as f:
        f.write(data)
    return data


def memfs(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(MEMFS + list(args), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode:
        raise AssertionError(f"memfs {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


def is_mounted(path: str) -> bool:
    return bool(mounts_at(os.path.realpath(path)))


@contextmanager
def mounted(pagemap: str | None, mountpoint: str, *extra: str,
            log: str | None = None) -> Iterator[subprocess.Popen]:
    """A real memfs mount in a foreground subprocess; always unmounted."""
    os.makedirs(mountpoint, exist_ok=True)
    log = log or mountpoint.rstrip("/") + ".log"
    args = MEMFS + ["mount", "-f", "--log", log] + ([pagemap] if pagemap else []) \
        + [mountpoint] + list(extra)
    # stderr to a file beside the log: what a daemon that dies says there (a
    # traceback, a one-line error) is in the report of the test that saw it
    with open(log + ".stderr", "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    DAEMONS.append((log, proc))
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(mountpoint, ".memfs", "pid")):
            if proc.poll() is not None:
                raise AssertionError(f"mount exited {proc.returncode}: "
                                     f"{file_tail(log + '.stderr')}\n{file_tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError("mount did not come up in 30 s\n" + file_tail(log))
            time.sleep(0.02)
        yield proc
    finally:
        _unmount(mountpoint)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print(f"daemon {proc.pid} did not stop:\n{thread_stacks(proc.pid)}")
            proc.kill()
            proc.wait()
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)


def _unmount(mountpoint: str) -> None:
    """fusermount3 -u, again while the kernel says busy: the RELEASE of a
    file closed a moment ago may not have reached the daemon yet (seen: busy
    right after close, unmounted 0.5 s later); a daemon left mounted waits
    forever and is killed."""
    for _ in range(50):
        if not is_mounted(mountpoint):
            return
        res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
        if res.returncode == 0 or "busy" not in res.stderr:
            return
        time.sleep(0.1)


def thread_stacks(pid: int) -> str:
    """Each thread of ``pid``: its name, state, wait channel and kernel stack
    (root): printed when a daemon does not stop, it tells a READ stuck in the
    daemon from a daemon stuck in the kernel."""
    out = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as e:
        return f"pid {pid}: {e.strerror}"
    for tid in tids:
        parts = []
        for name in ("comm", "wchan", "stack"):
            try:
                with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                    parts.append(f.read().strip())
            except OSError as e:
                parts.append(f"({name}: {e.strerror})")
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        out.append(f"thread {tid} {parts[0]} state {state} wchan {parts[1]}\n{parts[2]}")
    return "\n".join(out)


def file_tail(path: str, n: int = 3000) -> str:
    """The last ``n`` characters of a daemon's log or stderr file, for a
    failure's message ("" when there is none)."""
    try:
        with open(path) as f:
            return f.read()[-n:]
    except OSError:
        return ""


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (made here): a disk that fills up."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=700", "tmpfs",
                    str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_stat(mountpoint: str, name: str) -> int:
    with open(os.path.join(mountpoint, ".memfs", name)) as f:
        return int(f.read())


def pages_of(data: bytes, pages: Sequence[int]) -> bytes:
    return b"".join(data[p * PS:(p + 1) * PS] for p in pages)
