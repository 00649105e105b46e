"""``memfs migrate``: live-migrate a QEMU guest onto a memfs mount."""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_migrate(a: argparse.Namespace) -> int:
    import trio
    from ..capture_types import parse_ram_args
    from ..qemu.migrate import MigrateError, MigrateOptions, migrate
    from ..qemu.qmp import QMPError
    opts = MigrateOptions(
        source_qmp=a.source_qmp, rams=parse_ram_args(a.ram), volume=a.volume,
        pagemap=os.path.abspath(a.pagemap), dest_qmp=a.dest_qmp,
        dest_mount=os.path.abspath(a.dest_mount), passes=a.passes,
        incoming_uri=a.migrate_uri, outgoing_uri=a.source_uri, quit_source=a.quit_source,
        timeout=a.timeout, disk=a.disk,
        index=os.path.abspath(a.index) if a.index else None, disk_frozen=a.disk_frozen)
    if (opts.disk is None) != (opts.index is None):
        print("memfs: migrate: --disk and --index go together", file=sys.stderr)
        return 2
    try:
        rep = trio.run(migrate, opts)
    except (MigrateError, QMPError, OSError, trio.TooSlowError) as e:
        print(f"memfs: migrate failed: {e or type(e).__name__}", file=sys.stderr)
        return 1
    print(json.dumps(rep.as_dict(), indent=1) if a.json else rep.text())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate", help="live-migrate a QEMU guest onto a memfs mount",
        description="Capture the source guest's RAM to a volume (passes while it runs, "
        "the last one stopped), hand the page map to the destination's mount, migrate "
        "the device state with x-ignore-shared and resume the destination.")
    p.add_argument("--source-qmp", required=True, metavar="SOCK", help="source QEMU's QMP socket")
    p.add_argument("--ram", action="append", required=True, metavar="[NAME=]PATH",
                   help="the source's RAM file (shared memory backend); repeat per region")
    p.add_argument("--volume", metavar="URI",
                   help="migration volume (a source on a memfs mount with --volume: its own)")
    p.add_argument("--pagemap", required=True, metavar="PATH",
                   help="page map to write (the destination's mount reads it)")
    p.add_argument("--dest-qmp", required=True, metavar="SOCK",
                   help="destination QEMU's QMP socket (started with -incoming defer)")
    p.add_argument("--dest-mount", required=True, metavar="DIR",
                   help="the destination's memfs mount, waiting for its page map")
    p.add_argument("--passes", type=int, default=1, metavar="N",
                   help="capture passes while the source runs, before the final one (1)")
    p.add_argument("--migrate-uri", metavar="URI",
                   help="where the destination listens, e.g. tcp:HOST:PORT (default: a "
                   "local unix socket, both QEMUs on this host, stream bytes counted)")
    p.add_argument("--source-uri", metavar="URI",
                   help="where the source connects, if not --migrate-uri")
    p.add_argument("--quit-source", action="store_true",
                   help="quit the source QEMU once the destination runs")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds for the device-state migration (300)")
    p.add_argument("--disk", metavar="URI",
                   help="the guest's disk, frozen (a path or nbd:// URI, e.g. a qemu-nbd "
                   "--read-only export of a qcow2 snapshot base): pages equal to one of its "
                   "blocks are referenced there, not written to the volume (needs --index)")
    p.add_argument("--index", metavar="INDEX", help="the disk's index (memfs index)")
    p.add_argument("--disk-frozen", action="store_true",
                   help="the disk will not change while the page map refers to it, though "
                   "it is not read-only")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_migrate)
