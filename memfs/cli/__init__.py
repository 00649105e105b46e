"""The ``memfs`` command: capture, mount, load, save, umount, stats, index,
migrate, snapshot, restore.

Each sub-command lives in its own module (``memfs.cli.<command>``) as a
``cmd_<command>`` function, which turns arguments into a call to the layer
that does the work, and an ``add_parser`` that declares its arguments. This
package is the only place that knows every command: COMMANDS lists them,
statically imported, so ``main()`` may run any number of times in one process
and tools can follow every import.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

from .. import __version__
from ..logs import setup_logging
from . import capture, index, load, migrate, mount, restore, save, snapshot, stats, umount
from .common import UsageError

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

#: every sub-command, in the order ``memfs --help`` lists them
COMMANDS = (capture, mount, load, save, umount, stats, index, migrate, snapshot, restore)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"memfs: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """A new parser each call: nothing is registered process-wide."""
    p = _Parser(prog="memfs", description="Lazy guest RAM for live migration.")
    p.add_argument("--version", action="version", version=f"memfs {__version__}")
    p.add_argument("--debug", action="store_true", help="verbose logging")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Expected failures (OSError, any layer's error type) are one line
    ``memfs: …`` and exit status 1, usage errors 2; anything else is a bug
    and keeps its traceback."""
    a = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging(a.debug)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        return 130
    except BaseException as group:
        import traceback   # the error paths' imports: not on every command's start
        from ..report import error_line, is_expected, unwrap
        e = unwrap(group)
        if isinstance(e, KeyboardInterrupt):
            return 130
        if isinstance(e, UsageError):
            print(f"memfs: {error_line(e)}", file=sys.stderr)
            return 2
        if is_expected(e):
            print(f"memfs: {error_line(e)}", file=sys.stderr)
            return 1
        if not isinstance(e, Exception):
            raise
        traceback.print_exception(group)
        print(f"memfs: BUG: unexpected {type(e).__name__}: {error_line(e)} (the traceback "
              "above; please report it)", file=sys.stderr)
        return 1
