"""``memfs restore``: start guests from a snapshot (the arguments;
memfs.cli.restore_run does the work, imported only when it runs)."""

from __future__ import annotations

import argparse
import time


def cmd_restore(a: argparse.Namespace) -> int:
    t = {"start": time.monotonic()}
    from .restore_run import run
    return run(a, t)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore", help="start guests from a snapshot; RAM arrives on first touch",
        description="Check the snapshot, mount its page map (or use the mount at --mount), "
        "start --clones QEMUs with -incoming defer mapping the region with share=off, "
        "load the device state and resume them; each clone gets a new vmgenid, and its "
        "NICs are replugged with new MACs that the running guest sees.")
    p.add_argument("dir", metavar="DIR", help="snapshot directory (memfs snapshot --out)")
    p.add_argument("--mount", required=True, metavar="MNT",
                   help="where the snapshot is served (mounted if it is not a memfs mount)")
    p.add_argument("--clones", type=int, default=1, metavar="N", help="how many guests (1)")
    p.add_argument("--name", default="clone", help="clone name prefix (clone)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="QMP and serial sockets, console logs, pid files (DIR/run)")
    p.add_argument("--print-args", action="store_true",
                   help="mount, print each clone's QEMU command line and stop")
    p.add_argument("--qmp", action="append", metavar="SOCK",
                   help="drive this already started -incoming defer QEMU instead; repeat")
    p.add_argument("--no-trace", action="store_true",
                   help="do not fetch the snapshot's working-set trace first")
    p.add_argument("--store", metavar="DIR",
                   help="local store directory of the mount it makes (default: temporary)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="the mount it makes fetches only what the clones touch")
    p.add_argument("--prefetch-rate", metavar="BYTES/S",
                   help="limit the background completion of the mount it makes (e.g. 100M)")
    p.add_argument("--prefetch-delay", type=float, default=0.5, metavar="S",
                   help="the mount it makes starts its background completion (the "
                        "working-set trace first) once the clones' first faults paused S "
                        "seconds (0.5; 0: at once, competing with them)")
    p.add_argument("--keep-mac", action="store_true",
                   help="the clones' NICs keep the snapshot's MACs (no replug: for a "
                        "guest without PCI hotplug, or NICs on a bus without it)")
    p.add_argument("--mac-delay", type=float, default=0.5, metavar="S",
                   help="seconds between the resume and the NIC replug (0.5): the guest's "
                        "hotplug work would delay its first steps")
    p.set_defaults(func=cmd_restore)
