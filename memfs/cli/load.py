"""``memfs load``: hand a page map to a mount that waits for one."""

from __future__ import annotations

import argparse
import os


def cmd_load(a: argparse.Namespace) -> int:
    from .. import control
    from ..pagemap import PageMap
    PageMap.load(a.pagemap)  # a clear error here rather than a bare EINVAL later
    control.load(a.mountpoint, os.path.abspath(a.pagemap))
    print(f"memfs: page map {a.pagemap} installed on {a.mountpoint}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    lo = sub.add_parser("load", help="hand a page map to a waiting mount")
    lo.add_argument("mountpoint")
    lo.add_argument("pagemap")
    lo.set_defaults(func=cmd_load)
