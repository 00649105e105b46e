"""Capture's outputs, protected: the volume and the page map.

Why: two captures writing the same volume at once each leave a page map whose
checksums the other one's pages break; a ``--volume`` or ``--out`` that is in
fact one of the RAM files or the referenced disk gets written into.  So:

* the volume is opened without following a symbolic link (except a link
  that root or we own leading to a block device: LVM's ``/dev/VG/LV``), a
  new file volume is created with ``O_EXCL`` and mode 0600, and anything but
  a regular file or a block device is refused;
* the volume and the page map are locked (``flock``, exclusive, not waiting)
  for the whole capture: a second capture fails at once and the message
  names the process holding the lock (from ``/proc/locks``).  The page map
  is replaced by a rename, so its lock is a hidden ``.NAME.lock`` beside it,
  removed at the end; an NBD volume's lock is a file in ``/run/memfs/locks``
  named after its URI (captures on this host only: the NBD server arbitrates
  between hosts);
* files are compared by ``st_dev``/``st_ino``, never by name.

Every failure is an :class:`OutputError` with one line naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from dataclasses import dataclass

import xxhash

from .disks import DiskURI
from .fileio import PRIVATE, create_new

LOCK_DIR = "/run/memfs/locks"


class OutputError(Exception):
    """An output cannot be used; the message names it and says why."""


def file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def holder(st: os.stat_result) -> str:
    """Who holds a flock on the file ``st`` describes, from /proc/locks."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == want and parts[4] != "-1":
            pid = parts[4]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = ""
            if len(cmd) > 120:
                cmd = cmd[:117] + "..."
            return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"
    return "another process"


def _flock(fd: int, what: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"{what} is in use by {holder(os.fstat(fd))}: another capture is "
                          "writing it") from None
    except OSError as e:
        raise OutputError(f"{what}: cannot lock: {e.strerror}") from None


@dataclass
class Lock:
    """A held lock file, removed on release."""

    fd: int
    path: str

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if file_id(os.stat(self.path, follow_symlinks=False)) == file_id(os.fstat(self.fd)):
                os.unlink(self.path)  # still ours: no litter
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def lock_file(path: str, what: str) -> Lock:
    """Create (or open) and lock the lock file ``path``, checking afterwards
    that the name still leads to the file locked (a releaser unlinks it)."""
    for _ in range(8):
        try:
            fd = create_new(path, PRIVATE, os.O_RDWR)
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise OutputError(f"{what}: cannot open its lock {path}: {e.strerror}") from None
        except OSError as e:
            raise OutputError(f"{what}: cannot create its lock {path}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError(f"{what}: its lock {path} is not a regular file")
            _flock(fd, what)
            try:
                same = file_id(os.stat(path, follow_symlinks=False)) == file_id(os.fstat(fd))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return Lock(fd, path)
        os.close(fd)  # the previous holder removed it as we locked it: again
    raise OutputError(f"{what}: its lock {path} keeps changing")


def lock_pagemap(out: str) -> Lock:
    """Lock the page map ``out`` for the capture that will write it; refuses
    a missing directory, a symbolic link or a non-regular file at ``out``."""
    parent, name = os.path.split(os.path.abspath(out))
    what = f"page map {out}"
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutputError(f"{what}: {e.strerror}") from None
    else:
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{what} is a symbolic link (memfs never writes through one)")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} exists and is not a regular file")
    if not os.path.isdir(parent):
        raise OutputError(f"{what}: directory {parent} does not exist")
    return lock_file(os.path.join(parent, f".{name[:200]}.lock"), what)


def _lock_dir() -> str:
    """/run/memfs/locks for root; a private directory of ours otherwise."""
    try:
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
        return LOCK_DIR
    except PermissionError:
        pass
    d = os.path.join(tempfile.gettempdir(), f"memfs-{os.geteuid()}-locks")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OSError(errno.EPERM, "is not a private directory of ours", d)
    return d


def lock_uri(uri: str, parsed: DiskURI) -> Lock:
    """A host-wide lock for a volume that is not a local file (NBD), named
    after what the URI addresses (not its options)."""
    try:
        d = _lock_dir()
    except OSError as e:
        raise OutputError(f"volume {uri}: no lock directory: {e.filename}: "
                          f"{e.strerror}") from None
    key = f"{parsed.scheme}|{parsed.host}|{parsed.port}|{parsed.socket}|{parsed.export}"
    name = xxhash.xxh3_64_hexdigest(key.encode()) + ".lock"
    lock = lock_file(os.path.join(d, name), f"volume {uri}")
    lock.path = ""  # kept: other captures look for it under the same name
    return lock


def _trusted_link(path: str) -> bool:
    """A symbolic link we may follow: owned by root or by us, to a block device."""
    try:
        link = os.lstat(path)
        target = os.stat(path)
    except OSError:
        return False
    return link.st_uid in (0, os.geteuid()) and stat.S_ISBLK(target.st_mode)


@dataclass
class OpenVolume:
    fd: int
    size: int
    created: bool
    st: os.stat_result


def open_volume(path: str, inputs: dict[str, os.stat_result]) -> OpenVolume:
    """Open (or create, 0600, O_EXCL) and lock the file volume ``path``,
    refusing one of the ``inputs`` before touching it.  Nothing is written.
    The caller closes ``fd`` (and unlinks a volume it created if the capture
    fails: :func:`discard`)."""
    what = f"volume {path}"
    created = False
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = create_new(path, PRIVATE, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        created = True
    except FileExistsError:
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise OutputError(f"{what}: cannot open: {e.strerror}") from None
            if not _trusted_link(path):
                raise OutputError(f"{what} is a symbolic link (memfs never writes through "
                                  "one, except a root-owned link to a block device)") from None
            try:
                fd = os.open(path, flags)
            except OSError as e:
                raise OutputError(f"{what}: cannot open: {e.strerror}") from None
    except OSError as e:
        raise OutputError(f"{what}: cannot create: {e.strerror}") from None
    locked = False
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise OutputError(f"{what} is neither a regular file nor a block device")
        refuse_same({what: st}, inputs)
        os.set_blocking(fd, True)
        _flock(fd, what)
        locked = True
        if file_id(os.stat(path)) != file_id(st):
            raise OutputError(f"{what} was replaced while it was opened")
        have = os.lseek(fd, 0, os.SEEK_END)  # a file grows with its identity block
    except BaseException as e:
        if created and locked:  # unlocked: another capture may be using it already
            discard(fd, path)
        os.close(fd)
        if isinstance(e, OSError):
            raise OutputError(f"{what}: {e.strerror}") from None
        raise
    return OpenVolume(fd, have, created, st)


def discard(fd: int, path: str) -> None:
    """Remove a volume this capture created, if the name still leads to it."""
    try:
        if file_id(os.stat(path, follow_symlinks=False)) == file_id(os.fstat(fd)):
            os.unlink(path)
    except OSError:
        pass


def refuse_same(outputs: dict[str, os.stat_result], inputs: dict[str, os.stat_result]) -> None:
    """OutputError if an output is the same file as an input or another output."""
    seen: dict[tuple[int, int], str] = {}
    for name, st in inputs.items():
        seen.setdefault(file_id(st), name)
    for name, st in outputs.items():
        other = seen.get(file_id(st))
        if other is not None:
            raise OutputError(f"{name} is the same file as {other}: refusing to write into it")
        seen[file_id(st)] = name
