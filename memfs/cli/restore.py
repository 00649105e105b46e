"""``memfs restore``: start guests from a snapshot (the arguments;
memfs.cli.restore_run does the work, imported only when it runs)."""

from __future__ import annotations

import argparse
import sys
import time


def cmd_restore(a: argparse.Namespace) -> int:
    t = {"start": time.monotonic()}
    if a.pool:
        return _from_pool(a, t)
    from .restore_run import run
    t["imported"] = time.monotonic()  # trio, QEMU, the daemon for the forked mount
    return run(a, t)


def _from_pool(a: argparse.Namespace, t: dict[str, float]) -> int:
    """Ask the pool at --pool for --clones clones (memfs.pool_request: the
    ``memfs`` command usually gets there before argparse)."""
    if a.mount or a.qmp or a.print_args or a.serve:
        print("memfs: restore: --pool takes no --mount, --qmp, --print-args or --serve "
              "(the pool has its mount and its QEMUs)", file=sys.stderr)
        return 2
    from ..pool_request import PoolRequest, ask, usable_timeout
    if not usable_timeout(a.pool_timeout):
        print(f"memfs: restore: --pool-timeout {a.pool_timeout}: not a number of seconds "
              "above 0", file=sys.stderr)
        return 2
    return ask(PoolRequest(a.dir, a.pool, a.clones, a.pool_timeout), t["start"])


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore", help="start guests from a snapshot; RAM arrives on first touch",
        description="Check the snapshot, mount its page map (or use the mount at --mount), "
        "start --clones QEMUs with -incoming defer mapping the region with share=off, "
        "load the device state and resume them; each clone gets a new vmgenid, and its "
        "NICs are replugged with new MACs that the running guest sees.")
    p.add_argument("dir", metavar="DIR", help="snapshot directory (memfs snapshot --out)")
    p.add_argument("--mount", metavar="MNT",
                   help="where the snapshot is served (mounted if it is not a memfs mount)")
    p.add_argument("--clones", type=int, default=1, metavar="N", help="how many guests (1)")
    p.add_argument("--name", default="clone", help="clone name prefix (clone)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="QMP and serial sockets, console logs, pid files (DIR/run)")
    p.add_argument("--print-args", action="store_true",
                   help="mount, print each clone's QEMU command line and stop")
    p.add_argument("--qmp", action="append", metavar="SOCK",
                   help="drive this already started -incoming defer QEMU instead; repeat")
    p.add_argument("--serve", metavar="SOCK",
                   help="keep --clones clones started and waiting, and resume them when "
                        "memfs restore --pool SOCK asks (in the foreground, until SIGINT or "
                        "SIGTERM; ready: one JSON line on stdout; its mount completes at once)")
    p.add_argument("--pool", metavar="SOCK",
                   help="resume --clones clones of the pool at SOCK (memfs restore --serve) "
                        "instead of starting QEMUs")
    p.add_argument("--pool-timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for the pool's answer (300)")
    p.add_argument("--no-trace", action="store_true",
                   help="do not fetch the snapshot's working-set trace first")
    p.add_argument("--store", metavar="DIR",
                   help="local store directory of the mount it makes (default: unnamed "
                        "files in /var/tmp)")
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
