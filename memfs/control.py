"""Talking to a running mount through its ``.memfs/`` directory.

Why here: ``memfs load``, ``memfs migrate`` and tests all hand page maps to a
mount, ask it for its view (``save``) and read its stats; the file protocol
(write one command line to ``control``; on failure the write fails and
``last_error`` says why) lives in one place.

It also holds ``umount``, which works without the daemon when it must (a
dead daemon answers nothing; the mount table, who maps a region and aborting
a connection are memfs.mounttable), and the checks the daemon applies to a
path a control command asks it to write.

These calls block on FUSE I/O: from trio, run them in ``trio.to_thread``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from .mounttable import abort_connection, describe_mappers, find_mount, lexical, mappers

__all__ = ["ControlError", "send", "load", "save", "stop", "read_stats", "mount_root",
           "meta_path", "parse_line", "error_text", "umount", "writable_target"]

META = ".memfs"


class ControlError(Exception):
    """A control command failed; the message is the mount's own reason."""


def meta_path(mountpoint: str | os.PathLike[str], name: str) -> str:
    return os.path.join(os.fspath(mountpoint), META, name)


def send(mountpoint: str | os.PathLike[str], line: str) -> None:
    """Run one control command in the mount's daemon; returns once it is done.

    Only a refused command (EINVAL from the write) is explained by
    ``last_error``: a failed open (EACCES for a user who may not command this
    mount) says so itself, since ``last_error`` then belongs to someone else.
    """
    path = meta_path(mountpoint, "control")
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    except OSError as e:
        why = ""
        if e.errno == errno.EINVAL:
            try:
                with open(meta_path(mountpoint, "last_error")) as f:
                    why = f.read().strip()
            except OSError:
                pass
        raise ControlError(why or f"{path}: {e.strerror or e}") from None
    finally:
        try:
            os.close(fd)
        except OSError:  # a daemon told to stop may be gone before the FLUSH
            pass


def load(mountpoint: str | os.PathLike[str], pagemap: str | os.PathLike[str]) -> None:
    """Install ``pagemap`` into a mount that waits for its page map."""
    send(mountpoint, f"load {os.path.abspath(pagemap)}")


def save(mountpoint: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Write the mount's view (``PageServer.view``) to ``path``: the base for
    capturing the RAM it serves without faulting in its remote pages."""
    send(mountpoint, f"save {os.path.abspath(path)}")


def stop(mountpoint: str | os.PathLike[str], force: bool = False) -> None:
    """Ask the daemon to stop its prefetch and unmount once this control file
    is closed; refused (ControlError) while a process maps a region, unless
    ``force``."""
    send(mountpoint, "stop force" if force else "stop")


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


# -- the control-file language -------------------------------------------------

#: command -> what its argument must be ("" none, PATH absolute)
COMMANDS = {"load": "PATH", "save": "PATH", "trace": "PATH", "flush": "PATH",
            "stop": "[force]", "sync": "", "sync-pause": "", "sync-resume": "",
            "sync-rate": "BYTES", "volume": "URI",
            "base": "PATH", "delta": "PATH", "stage": "PATH", "commit": "PATH"}


def parse_line(line: str) -> tuple[str, str]:
    """One control line -> (command, argument); ControlError with a message an
    operator can act on for anything else (the daemon answers EINVAL)."""
    cmd, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    kind = COMMANDS.get(cmd)
    if kind is None:
        known = ", ".join(f"{c} {a}".strip() for c, a in COMMANDS.items())
        raise ControlError(f"unknown control command {_short(cmd)} (known: {known})")
    if kind == "[force]":
        if arg not in ("", "force"):
            raise ControlError(f"{cmd} takes no argument but 'force', not {_short(arg)}")
    elif not kind:
        if arg:
            raise ControlError(f"{cmd} takes no argument, not {_short(arg)}")
    elif not arg:
        raise ControlError(f"{cmd} needs {kind}")
    elif not arg.isprintable():
        raise ControlError(f"{cmd}: {_short(arg)} holds control characters")
    elif kind == "PATH" and not os.path.isabs(arg):
        raise ControlError(f"{cmd} needs an absolute path, not {_short(arg)}")
    return cmd, arg


def error_text(line: str, err: BaseException) -> str:
    """``last_error`` for a failed command: one printable line."""
    text = f"{_printable(line.strip())[:200]}: {err}"
    return _printable(text)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(text: str) -> str:
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


# -- paths the daemon writes for a control command --------------------------------

@contextmanager
def writable_target(path: str, allowed: Iterable[str], trusted: Iterable[int],
                    private_ok: bool = False) -> Iterator[str]:
    """A name under which ``path`` can be written without following a link
    that someone else planted; ControlError when ``path`` is not allowed.

    ``path``'s directory is opened one component at a time without following
    symbolic links and is held open, so that a rename of one of its parents
    after the check cannot redirect the write: the caller writes (and renames
    into place) through ``/proc/self/fd/N/NAME``.  The directory must lie
    under one of ``allowed`` (``--control-dir``, or the mount's own files'
    directories) or, with ``private_ok``, be one that only a ``trusted`` uid
    (root, the mount's owner) can write.  An existing ``path`` must be a
    regular file, not a symbolic link.
    """
    path = os.path.normpath(path)
    if not os.path.isabs(path) or path == "/":
        raise ControlError(f"{path} is not an absolute file path")
    parent, name = os.path.split(path)
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walked = "/"
        for comp in [c for c in parent.split("/") if c]:
            walked = os.path.join(walked, comp)
            try:
                nfd = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except OSError as e:
                if _is_link(comp, fd):
                    raise ControlError(f"refused: {walked} is a symbolic link "
                                       f"(memfs writes only through real directories)") from None
                raise ControlError(f"{walked}: {e.strerror}") from None
            os.close(fd)
            fd = nfd
        roots = sorted({os.path.normpath(a) for a in allowed})
        if not any(parent == r or parent.startswith(r.rstrip("/") + "/") for r in roots):
            st = os.fstat(fd)
            private = st.st_uid in set(trusted) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if not (private_ok and private):
                where = f"under {', '.join(roots)}" if roots else "nowhere"
                if private_ok:
                    where += " or in a directory only root or its owner can write"
                raise ControlError(f"refused: this mount writes only {where}, not in "
                                   f"{parent} (mount option --control-dir DIR)")
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISLNK(st.st_mode):
                raise ControlError(f"refused: {path} is a symbolic link")
            if not stat.S_ISREG(st.st_mode):
                raise ControlError(f"refused: {path} exists and is not a regular file")
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


# -- unmounting (the mount table and mappers: memfs.mounttable) --------------------

def _daemon_state(mountpoint: str, timeout: float) -> tuple[int | None, str]:
    """(pid, "alive" | "closed" | "hung" | "dead" | "denied"), from ``.memfs/pid`` read in
    a thread: a daemon that died while something still holds its connection
    (or one that is stopped) never answers; one that died alone leaves a
    closed connection (ENOTCONN)."""
    result: list[Any] = [None, "hung"]

    def read() -> None:
        try:
            with open(meta_path(mountpoint, "pid")) as f:
                result[:] = [int(f.read()), "alive"]
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                result[1] = "denied"
            else:
                result[1] = "closed" if e.errno in (errno.ENOTCONN, errno.ECONNABORTED) \
                    else "dead"
        except ValueError:
            result[1] = "dead"

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    pid, state = result
    if state == "alive":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            state = "dead"
        except PermissionError:
            pass
    return pid, state


def _running(pid: int) -> bool:
    """False once ``pid`` has exited, zombie included: a daemonized memfs is
    reaped by init, which may take its time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


_MNT_DETACH = 2


def _detach(mountpoint: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH):
        err = ctypes.get_errno()
        raise ControlError(f"cannot detach {mountpoint}: {os.strerror(err)}")


def umount(mountpoint: str | os.PathLike[str], *, force: bool = False,
           timeout: float = 60.0) -> str:
    """Unmount a memfs mount: stop its daemon cleanly, or clean up after a dead
    one.  Returns what was done for the operator; ControlError says why not.

    A region that a process maps is never detached without ``force``: the
    process would get SIGBUS on its next uncached page, a guest its dirty pages
    lost.  A live daemon is told ``stop``: it stops prefetching, lets go of its
    own files on the mount and unmounts once the command's file is closed.
    """
    entry = find_mount(mountpoint)
    mp = lexical(mountpoint)
    if entry is None:
        raise ControlError(f"{mp} is not mounted")
    if not entry.is_memfs:
        raise ControlError(f"{mp} is not a memfs mount (it is {entry.fstype})")
    wait = min(5.0, timeout)
    pid, state = _daemon_state(mp, timeout=wait)
    if state == "denied":
        raise ControlError(f"{meta_path(mp, 'pid')}: Permission denied")
    found = mappers(entry, exclude=[pid] if pid else [])
    if found and not force:
        raise ControlError(f"not unmounting {mp}: {describe_mappers(found)} "
                           f"(stop it first, or --force)")
    if state == "closed":
        _detach(mp)
        return f"the daemon of {mp} is gone (its FUSE connection is closed): detached {mp}"
    if state != "alive":
        did = abort_connection(entry)
        _detach(mp)
        who = "is gone" if state == "dead" else f"does not answer (not in {wait:g}s)"
        return f"the daemon of {mp} {who}: {did} and detached {mp}"
    assert pid is not None
    stop(mp, force=force)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            # exited; give init a moment to reap it, so that the pid is gone too
            reaped = min(deadline, time.monotonic() + 5.0)
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < reaped:
                time.sleep(0.02)
            break
        time.sleep(0.02)
    else:
        raise ControlError(f"the daemon of {mp} (pid {pid}) is still running after "
                           f"{timeout:g}s")
    if find_mount(mp) == entry:  # the daemon died before it could unmount
        _detach(mp)
    return ""
