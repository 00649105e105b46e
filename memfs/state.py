"""The state directory: what a mount knows, kept where a dead daemon leaves it.

DESIGN.md invariant 9: the guest's memory outlives the daemon.  A daemon
keeps three things that a successor needs, all under one directory (0700,
every file 0600, created ``O_EXCL | O_NOFOLLOW``)::

    STATE/meta.json   the mount: mount point, regions, options (written once)
    STATE/pagemap     the page map as it was installed (pristine: no LOCAL page)
    STATE/journal     page-state changes since then, one 32-byte record each
    STATE/store/      the local store (one sparse file per region)
    STATE/lock        flock()ed by the supervisor that owns the mount

Page states are rebuilt as *installed page map + journal*: a record says
"these pages are LOCAL now", either because the guest WROTE them or because
they were fetched and KEPT; the store holds their bytes.  The journal is
written with a plain pwrite() (the page cache keeps it when the process dies)
*after* the store write and *before* the state change is visible or the WRITE
is acknowledged, so a SIGKILL right after an acknowledged WRITE loses nothing,
and a SIGKILL before it leaves the page as it was (the kernel resends the
WRITE).  Which pages were served is not journaled: after a restart every page
counts as served, so nothing is ever pushed over a page the kernel may hold.

The journal's format and its appends are memfs.journal.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import stat
from typing import TYPE_CHECKING, Any, Iterator

from .fileio import PRIVATE, atomic_write, create_new
from .journal import HEADER, Journal, StateError, replay
from .pagemap import PageMap, PageState, runs

__all__ = ["State", "StateError", "Journal", "default_dir"]

if TYPE_CHECKING:
    from .pages import PageServer

log = logging.getLogger("memfs.state")

DEFAULT_ROOT = "/var/lib/memfs"
LOCAL = PageState.LOCAL


def default_dir(mountpoint: str) -> str:
    """Where ``--supervise`` keeps a mount's state without ``--state``."""
    name = os.path.abspath(mountpoint).strip("/").replace("/", "-") or "root"
    return os.path.join(DEFAULT_ROOT, name)


def _private_dir(path: str, create: bool) -> None:
    """``path`` is (or becomes) a directory of ours that nobody else can enter."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise StateError(f"cannot create the state directory {path}: {e.strerror}") from None
    try:
        st = os.lstat(path)
    except OSError as e:
        raise StateError(f"state directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"state directory {path} is not a directory (or is a symbolic link)")
    if st.st_uid != os.geteuid():
        raise StateError(f"state directory {path} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        if not create:
            raise StateError(f"state directory {path} is open to other users "
                             f"(mode {st.st_mode & 0o777:o}; want 700)")
        os.chmod(path, 0o700)


# -- the directory -------------------------------------------------------------------

@dataclasses.dataclass
class State:
    """An open state directory."""

    path: str
    meta: dict[str, Any]
    lock_fd: int = -1
    journal: Journal | None = None
    #: per region: pages the journal says the guest wrote / the store kept
    wrote: dict[str, bytearray] = dataclasses.field(default_factory=dict)
    kept: dict[str, bytearray] = dataclasses.field(default_factory=dict)
    #: a daemon before this one served pages (the kernel may hold any of them)
    resumed: bool = False

    @property
    def store_dir(self) -> str:
        return self.meta.get("store_dir") or os.path.join(self.path, "store")

    @property
    def mountpoint(self) -> str:
        return self.meta["mountpoint"]

    @property
    def regions(self) -> dict[str, int]:
        return dict(self.meta["regions"])

    @property
    def pagemap_path(self) -> str:
        return os.path.join(self.path, "pagemap")

    @classmethod
    def create(cls, path: str, mountpoint: str, regions: dict[str, int],
               options: dict[str, Any]) -> "State":
        """A new state directory for a fresh mount; refuses one in use."""
        path = os.path.abspath(path)
        if os.path.dirname(path) == DEFAULT_ROOT:
            os.makedirs(DEFAULT_ROOT, 0o700, exist_ok=True)
            _private_dir(DEFAULT_ROOT, create=True)
        _private_dir(path, create=True)
        if os.path.lexists(os.path.join(path, "meta.json")):
            raise StateError(f"state directory {path} holds the state of another mount "
                             f"(continue it with: memfs mount --resume {path})")
        st = cls(path, {"version": 1, "mountpoint": mountpoint, "regions": regions,
                        "store_dir": options.pop("store_dir", None), "options": options})
        st.lock()
        store = st.store_dir
        if not st.meta["store_dir"]:
            _private_dir(store, create=True)
        Journal.create(os.path.join(path, "journal"), sorted(regions)).close()
        atomic_write(os.path.join(path, "meta.json"),
                     [json.dumps(st.meta, indent=1).encode()])
        return st

    @classmethod
    def open(cls, path: str) -> "State":
        path = os.path.abspath(path)
        _private_dir(path, create=False)
        meta_path = os.path.join(path, "meta.json")
        try:
            fd = os.open(meta_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise StateError(f"{path} is not a memfs state directory (no meta.json)") from None
        except (OSError, ValueError) as e:
            raise StateError(f"{meta_path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("version") != 1 \
                or not isinstance(meta.get("regions"), dict) or not meta["regions"] \
                or not all(isinstance(n, str) and n and "/" not in n and "\0" not in n
                           and not n.startswith(".") and type(v) is int and v > 0
                           for n, v in meta["regions"].items()) \
                or not isinstance(meta.get("mountpoint"), str) \
                or not isinstance(meta.get("options", {}), dict) \
                or not isinstance(meta.get("store_dir") or "", str):
            raise StateError(f"{meta_path}: not a memfs state (version 1)")
        return cls(path, meta)

    def lock(self) -> None:
        """Take the directory for this process (the supervisor): one owner."""
        lp = os.path.join(self.path, "lock")
        try:
            fd = os.open(lp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = create_new(lp, PRIVATE, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"state directory {self.path} is in use by another memfs") from None
        self.lock_fd = fd

    def load_pagemap(self) -> PageMap | None:
        if not os.path.lexists(self.pagemap_path):
            return None
        return PageMap.load(self.pagemap_path)

    def save_pagemap(self, pm: PageMap) -> None:
        """Keep the page map as installed (before any page changes state)."""
        pm.save(self.pagemap_path)

    def installing(self, pm: PageMap) -> None:
        """The daemon installs ``pm``: keep it unless it came from here."""
        if not os.path.lexists(self.pagemap_path):
            self.save_pagemap(pm)

    def open_journal(self) -> Journal:
        """Open the journal for this daemon and read what it says so far."""
        names = sorted(self.regions)
        self.journal, sets = Journal.open(os.path.join(self.path, "journal"), names)
        self.wrote = {n: s[0] for n, s in sets.items()}
        self.kept = {n: s[1] for n, s in sets.items()}
        return self.journal

    def local_pages(self, name: str) -> Iterator[tuple[int, int]]:
        """(first, end) stretches of pages the journal made LOCAL."""
        w, k = self.wrote.get(name, bytearray()), self.kept.get(name, bytearray())
        both = bytearray(max(len(w), len(k)))
        both[:len(w)] = w
        for i, v in enumerate(k):
            if v:
                both[i] = 1
        yield from runs(both)

    def restore(self, pages: "PageServer") -> int:
        """Apply the journal to the installed page map; after another daemon
        mark every page served (the kernel may hold any of them, dirty), and
        every page the guest wrote dirty (a volume may not have it yet).
        Runs on the loop right after install: no I/O sees the map between."""
        assert pages.pagemap is not None
        served = self.resumed
        n = 0
        for r in pages.pagemap.regions:
            for first, end in self.local_pages(r.name):
                end = min(end, r.npages)
                r.set_states(first, end, LOCAL)  # the gauges' tally follows
                n += end - first
            w = self.wrote.get(r.name, bytearray())
            for at, end in runs(w) if hasattr(pages, "dirty") else ():
                pages.dirty.mark(r.name, at, min(end, r.npages))
            if served:
                pages.mark_served(r.name, 0, r.npages)
        log.info("state %s: %d pages local from the journal (%d written by the guest)%s",
                 self.path, n, sum(w.count(1) for w in self.wrote.values()),
                 "; every page counts as served" if served else "")
        return n

    def discard(self) -> None:
        """Undo ``create`` after a mount that never served: remove what it
        made, so that the same command can be run again.  Only while the
        journal is empty and the store files hold no block."""
        jp = os.path.join(self.path, "journal")
        try:
            with open(jp, "rb") as f:
                if replay(f.read(), len(self.regions))[1] != HEADER.size:
                    return
        except (OSError, StateError):
            return
        store = self.store_dir
        pages = [os.path.join(store, f"{n}.pages") for n in self.regions]
        for p in pages:
            try:
                if os.lstat(p).st_blocks:
                    return
            except FileNotFoundError:
                pass
        for p in pages + [os.path.join(self.path, n) for n in ("pagemap", "journal",
                                                               "meta.json")]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if not self.meta.get("store_dir"):
            try:
                os.rmdir(store)
            except OSError:
                pass

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
