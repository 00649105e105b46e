"""Running a daemon in the background, the way ``memfs mount`` does.

Why one place: a daemonized mount and a daemonized supervisor both fork, detach
from the terminal, log to a file, and must tell the waiting command whether
they came up; the readiness pipe and its one-line error are the same code.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from .report import error_line, unwrap

log = logging.getLogger("memfs.detach")

#: what a detached child calls once it serves: ``ready(detail)``
Ready = Callable[[str], None]


def run_detached(work: Callable[[Ready], int], logfile: str, debug: bool) -> tuple[bool, str]:
    """Fork a detached child (new session, stdio on /dev/null, logging to
    ``logfile``) that runs ``work(ready)``.  In the parent: wait until the
    child calls ``ready(detail)`` -> (True, detail), or fails or dies ->
    (False, its one-line error, or "" if it died without a word)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace").strip()
        if msg.startswith("OK"):
            return True, msg[2:].strip()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return False, msg
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    from .logs import open_log, setup_logging
    setup_logging(debug, logfile)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    # stderr to the log: what Python prints there itself (a traceback of a
    # thread, a fatal error, faulthandler) must not vanish with the terminal
    err = open_log(logfile) if logfile else None
    os.dup2(err.fileno() if err is not None else null, 2)

    def ready(detail: str) -> None:
        os.write(w, f"OK {detail}\n".encode())
        os.close(w)

    code = 0
    try:
        code = work(ready)
    except BaseException as e:  # report whatever stopped us to the waiting parent
        log.exception("daemon failed")
        try:
            os.write(w, f"{error_line(unwrap(e))}\n".encode())  # one line, not a group
        except OSError:
            pass
        code = 1
    os._exit(code)
