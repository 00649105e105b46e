"""``memfs stats``: a mount's ``.memfs/stats.json`` rendered for people."""

from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_stats(a: argparse.Namespace) -> int:
    from .. import control
    from ..report import render_stats
    while True:
        try:
            snap = control.read_stats(a.mountpoint)
        except OSError as e:
            print(f"memfs: cannot read stats of {a.mountpoint}: {e.strerror}", file=sys.stderr)
            return 1
        text = json.dumps(snap, indent=1, sort_keys=True) if a.json else render_stats(snap)
        if a.watch is None:
            print(text)
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        sys.stdout.flush()
        time.sleep(a.watch)


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("stats", help="show a mount's statistics")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true", help="raw JSON")
    s.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                   help="refresh in place")
    s.set_defaults(func=cmd_stats)
