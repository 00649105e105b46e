"""What a mount is before its daemon serves it: the options, the check of
the mount point, and the tuning of its bdi (read-ahead, write-back limits).

Apart from memfs.daemon so that the CLI, the supervisor and the tests can
build options without the daemon's machinery in mind.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .mounttable import find_mount
from .pagemap import PageMap

log = logging.getLogger("memfs.daemon")

__all__ = ["MountOptions", "MountError", "check_mountpoint", "mount_dev", "tune_bdi"]


@dataclass
class MountOptions:
    mountpoint: str
    pagemap: PageMap | None = None
    #: region name -> size, for a mount that waits for its page map
    regions: dict[str, int] = field(default_factory=dict)
    store_dir: str | None = None
    allow_other: bool = False
    debug_fuse: bool = False
    read_ahead_kb: int | None = None
    max_read: int | None = None
    fetch_retries: int = 3
    mode: int = 0o600
    bdi_max_ratio: int | None = None
    bdi_strict_limit: int | None = None
    #: background completion (issue: prefetch into the page cache)
    prefetch: bool = True
    push: bool = True
    prefetch_rate: float | None = None
    prefetch_trace: str | None = None
    #: seconds: the background completion waits for the first READ, then
    #: until READs paused this long (at most 10 times as long), so that the
    #: guests' first faults do not compete with it (restore); None: at once
    prefetch_delay: float | None = None
    #: where the working-set trace goes at unmount (None: beside the page map)
    trace_out: str | None = None
    pagemap_path: str | None = None
    #: memfs.state: a state directory (under a supervisor); its store is continued
    state_dir: str | None = None
    #: the regions start as all-zero pages instead of waiting for a page map
    #: (a source mount: the guest boots on it)
    new: bool = False
    #: where written pages are copied in the background (memfs.sync)
    volume: str | None = None
    #: bytes per second for that copy (None: unlimited)
    sync_rate: float | None = None
    #: start with the background copy paused
    sync_paused: bool = False
    #: seconds between background write-back + copy passes
    sync_interval: float = 1.0
    #: the only directories control commands (save, trace, flush) may write
    #: to; empty: the page map's, the store's, and directories only root or
    #: the mount's owner can write
    control_dirs: list[str] = field(default_factory=list)


class MountError(Exception):
    """The mount could not be set up; the message says why."""


def check_mountpoint(path: str) -> None:
    """The mount point must be an existing, empty directory."""
    if not os.path.exists(path):
        raise MountError(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"mount point {path} is already a mount point")
    if os.listdir(path):
        raise MountError(f"mount point {path} is not empty")


def mount_dev(real: str) -> str | None:
    """MAJ:MIN of the filesystem mounted at the resolved path ``real``, from
    mountinfo: any stat() of the mount from the daemon itself (realpath
    included) would deadlock before the loop runs."""
    entry = find_mount(real)
    return entry.dev if entry else None


def tune_bdi(dev: str, opts: MountOptions) -> dict[str, int]:
    """Apply read-ahead and write-back limits to the mount's bdi."""
    applied: dict[str, int] = {}
    for key, value in (("read_ahead_kb", opts.read_ahead_kb),
                       ("max_ratio", opts.bdi_max_ratio),
                       ("strict_limit", opts.bdi_strict_limit)):
        if value is None:
            continue
        path = f"/sys/class/bdi/{dev}/{key}"
        try:
            with open(path, "w") as f:
                f.write(f"{value}\n")
            applied[key] = value
        except OSError as e:
            log.warning("cannot set %s=%s: %s", path, value, e.strerror)
    return applied
