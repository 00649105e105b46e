"""``memfs save``: write a mount's view, for an onward ``capture --view``."""

from __future__ import annotations

import argparse
import os


def cmd_save(a: argparse.Namespace) -> int:
    from .. import control
    control.save(a.mountpoint, os.path.abspath(a.out))
    print(f"memfs: the view of {a.mountpoint} is in {a.out} (capture --view {a.out})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("save", help="write a mount's view, for an onward capture --view")
    sv.add_argument("mountpoint")
    sv.add_argument("out", metavar="PAGEMAP")
    sv.set_defaults(func=cmd_save)
