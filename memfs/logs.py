"""Where memfs logs: one formatter for the CLI, the detached daemon and the
supervisor, and log files only their owner reads.

Its own module so that the daemon side (detach, supervisor) can set up its
logging without importing the command line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

#: where daemons log by default: 0700, files 0600
RUN_DIR = "/run/memfs"


def open_log(path: str) -> Any:
    """A log file that only its owner reads (paths and pids are in it), opened
    without following a link at its name."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a", buffering=1)


def setup_logging(debug: bool, logfile: str | None = None) -> None:
    """Every record to stderr or LOGFILE, with the pid (daemon and supervisor
    share a log)."""
    handler: logging.Handler = logging.StreamHandler(open_log(logfile) if logfile
                                                     else sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
