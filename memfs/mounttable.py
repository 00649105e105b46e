"""The mount table (/proc/self/mountinfo), who maps a mount's files, and
aborting a FUSE connection: what the operator's commands, the daemon, the
tests and the tools need around a mount without going through it (a dead or
hung daemon answers nothing, and a stat of its mount point would block).

One reader of mountinfo for all of them: its fields are space separated with
spaces, tabs, newlines and backslashes in paths escaped as octal.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Iterable

__all__ = ["MountEntry", "mount_table", "mounts_at", "find_mount", "lexical", "mappers",
           "describe_mappers", "abort_connection", "FUSECTL"]

MOUNTINFO = "/proc/self/mountinfo"
#: fusectl: one directory per FUSE connection, named by the mount's minor number
FUSECTL = "/sys/fs/fuse/connections"


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    major: int
    minor: int
    fstype: str

    @property
    def is_memfs(self) -> bool:
        return self.fstype == "fuse.memfs"

    @property
    def dev(self) -> str:
        """``MAJ:MIN``, as /sys/class/bdi names the mount's bdi."""
        return f"{self.major}:{self.minor}"


def _unescape(field: str) -> str:
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def parse_line(line: str) -> MountEntry:
    """One mountinfo line: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [TAGS…] - FSTYPE …"""
    parts = line.split()
    sep = parts.index("-", 6)
    major, minor = (int(x) for x in parts[2].split(":"))
    return MountEntry(_unescape(parts[4]), major, minor, parts[sep + 1])


def mount_table() -> list[MountEntry]:
    """Every mount this process sees, in mount order (the last one at a
    path is on top)."""
    with open(MOUNTINFO) as f:
        return [parse_line(line) for line in f]


def lexical(path: str | os.PathLike[str]) -> str:
    """The absolute path of ``path`` with its parent's links resolved, without
    touching ``path`` itself (a stat of a dead or hung mount would block)."""
    p = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(p)
    return os.path.join(os.path.realpath(parent), name) if name else p


def mounts_at(path: str | os.PathLike[str]) -> list[MountEntry]:
    """The mounts stacked at ``path``, bottom first (no stat of the mount)."""
    want = lexical(path)
    return [e for e in mount_table() if e.mountpoint == want]


def find_mount(path: str | os.PathLike[str]) -> MountEntry | None:
    """The mount on top at ``path``, or None (no stat of the mount itself)."""
    found = mounts_at(path)
    return found[-1] if found else None


def abort_connection(entry: MountEntry) -> str:
    """Abort the mount's FUSE connection: its requests fail, nothing waits any
    more (fusectl is mounted first if the system has not).  Returns what was
    done, for the operator."""
    if not os.path.exists(f"{FUSECTL}/{entry.minor}"):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    try:
        with open(f"{FUSECTL}/{entry.minor}/abort", "w") as f:
            f.write("1\n")
        return f"aborted FUSE connection {entry.minor}"
    except OSError as e:
        return f"could not abort FUSE connection {entry.minor} ({e.strerror})"


def _mapped_names(pid: str, entry: MountEntry, prefix: str) -> set[str]:
    """Files of the mount that process ``pid`` maps (by device, or by a path
    under the mount point)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()  # gone, or a kernel thread
    names: set[str] = set()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        maj, _, mnr = parts[3].partition(":")
        try:
            same_dev = (int(maj, 16), int(mnr, 16)) == (entry.major, entry.minor)
        except ValueError:
            same_dev = False
        if same_dev or parts[5].startswith(prefix):
            names.add(os.path.basename(parts[5].removesuffix(" (deleted)")))
    return names


def mappers(entry: MountEntry, exclude: Iterable[int] = ()) -> dict[int, tuple[str, set[str]]]:
    """pid -> (command name, region files it maps) for every process that maps
    a file of the mount, by device number (or by path, for a mapping made
    through a name under the mount point)."""
    skip = set(exclude) | {os.getpid()}
    prefix = entry.mountpoint.rstrip("/") + "/"
    out: dict[int, tuple[str, set[str]]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in skip:
            continue
        names = _mapped_names(d, entry, prefix)
        if names:
            try:
                with open(f"/proc/{d}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            out[int(d)] = (comm, names)
    return out


def describe_mappers(found: dict[int, tuple[str, set[str]]]) -> str:
    """``ram0 is mapped by pid 12 (qemu-system-x86)`` for a message."""
    regions = sorted(set().union(*(names for _, names in found.values())))
    who = ", ".join(f"pid {pid} ({comm})" for pid, (comm, _) in sorted(found.items()))
    return f"{', '.join(regions)} {'is' if len(regions) == 1 else 'are'} mapped by {who}"
