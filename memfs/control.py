"""Talking to a running mount through its ``.memfs/`` directory.

Why here: ``memfs load``, ``memfs migrate`` and tests all hand page maps to a
mount, ask it for its view (``save``) and read its stats; the file protocol
(write one command line to ``control``; on failure the write fails and
``last_error`` says why) lives in one place.

These calls block on FUSE I/O: from trio, run them in ``trio.to_thread``.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["ControlError", "send", "load", "save", "read_stats", "mount_root", "meta_path"]

META = ".memfs"


class ControlError(Exception):
    """A control command failed; the message is the mount's own reason."""


def meta_path(mountpoint: str | os.PathLike[str], name: str) -> str:
    return os.path.join(os.fspath(mountpoint), META, name)


def send(mountpoint: str | os.PathLike[str], line: str) -> None:
    """Run one control command in the mount's daemon; returns once it is done."""
    try:
        with open(meta_path(mountpoint, "control"), "w") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as e:
        why = ""
        try:
            with open(meta_path(mountpoint, "last_error")) as f:
                why = f.read().strip()
        except OSError:
            pass
        raise ControlError(why or f"{mountpoint}: {e.strerror or e}") from None


def load(mountpoint: str | os.PathLike[str], pagemap: str | os.PathLike[str]) -> None:
    """Install ``pagemap`` into a mount that waits for its page map."""
    send(mountpoint, f"load {os.path.abspath(pagemap)}")


def save(mountpoint: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Write the mount's view (``PageServer.view``) to ``path``: the base for
    capturing the RAM it serves without faulting in its remote pages."""
    send(mountpoint, f"save {os.path.abspath(path)}")


def read_stats(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    with open(meta_path(mountpoint, "stats.json")) as f:
        return json.load(f)


def mount_root(path: str | os.PathLike[str]) -> str | None:
    """The memfs mount that serves the file ``path``, or None if it is not in one."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.ismount(d):
            return d if os.path.exists(meta_path(d, "control")) else None
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
