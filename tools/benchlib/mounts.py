"""The memfs command line as the benchmarks run it: ``memfs ARGS`` on this
host or the rig's destination host, and unmounting that never hangs a run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from memfs.mounttable import abort_connection, mounts_at

from benchlib import rigstate

MEMFS = [sys.executable, "-m", "memfs.cli"]


async def memfs_cli(*args: str, check: bool = True, on_dst: bool = False) -> Any:
    """``memfs ARGS`` on the source host (where this process runs), or on the
    destination host with ``on_dst`` (the destination's mount daemon)."""
    prefix = rigstate.dst_prefix() if on_dst else []
    return await trio.run_process([*prefix, *MEMFS, *args], check=check,
                                  capture_stdout=True, capture_stderr=True)


def fuse_abort(mnt: Path, who: str = "bench-migrate") -> None:
    """Abort the FUSE connection of ``mnt``: a hung daemon must not hang the
    benchmark (its row reports the error)."""
    print(f"{who}: aborting the memfs mount {mnt}", file=sys.stderr)
    for entry in mounts_at(mnt):
        abort_connection(entry)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=10)


async def stop_mount(mnt: Path, who: str = "bench-migrate") -> None:
    """``memfs umount``; a mount it could not stop is aborted, and why is said."""
    res = None
    with trio.CancelScope(shield=True), trio.move_on_after(30):
        res = await memfs_cli("umount", "--timeout", "20", str(mnt), check=False)
    if res is None or res.returncode or os.path.ismount(mnt):
        why = "timed out" if res is None else res.stderr.decode(errors="replace").strip()
        print(f"{who}: memfs umount {mnt}: {why}", file=sys.stderr)
        fuse_abort(mnt, who)


def umount(mnt: Path) -> None:
    """``memfs umount`` whatever it says: a run's clean-up, in a finally."""
    subprocess.run([*MEMFS, "umount", str(mnt)], capture_output=True, timeout=120)


def new_mount(mnt: Path, ram: int, volume: Path, store: Path, extra: Sequence[str] = (),
              quiet: bool = False) -> None:
    """``memfs mount --new ram0:RAM --volume --store [EXTRA] MNT``: a source
    mount; ``quiet`` keeps the command's output out of the benchmark's."""
    subprocess.run([*MEMFS, "mount", "--new", f"ram0:{ram}", "--volume", str(volume),
                    "--store", str(store), *extra, str(mnt)], check=True, capture_output=quiet)
