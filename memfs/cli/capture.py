"""``memfs capture``: RAM (or a tracking mount) -> migration volume + page map."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from .common import UsageError


def cmd_capture(a: argparse.Namespace) -> int:
    if a.from_mount:
        return cmd_capture_from_mount(a)
    if not a.ram or not a.volume:
        raise UsageError("capture needs --ram and --volume (or --from-mount MNT)")
    referencer = None
    if a.disk or a.index:
        from ..index.referencer import open_referencer  # issue 6: disk references
        if not (a.disk and a.index):
            raise UsageError("--disk and --index go together")
        referencer = open_referencer(a.disk, a.index, frozen=a.disk_frozen)
    import trio
    from ..capture import capture
    from ..capture_types import parse_ram_args
    if not a.debug:  # the answer to a failure is one line; --debug shows the disks' log
        logging.getLogger().setLevel(logging.CRITICAL)
    res = trio.run(lambda: capture(parse_ram_args(a.ram), a.volume, a.out, base=a.base,
                                   referencer=referencer, view=a.view,
                                   progress=None if not a.no_progress else False))
    if a.json:
        print(json.dumps(res.as_dict(), indent=1))
    else:
        mib = res.bytes_written / (1 << 20)
        print(f"captured {res.pages_total} pages in {res.seconds:.2f}s: "
              f"{res.pages_zero} zero, {res.pages_written} written ({mib:.1f} MiB), "
              f"{res.pages_unchanged} unchanged since the base pass, "
              f"{res.pages_referenced} referenced on a disk")
        print(f"page map: {res.pagemap}")
    return 0


def cmd_capture_from_mount(a: argparse.Namespace) -> int:
    """A mount that tracks what its guest writes makes the page map itself:
    write-back, copy of the dirty pages to its volume, page map."""
    from .. import control
    from ..pagemap import PageMap
    if a.ram or a.base or a.view or a.disk:
        raise UsageError("--from-mount takes only --out (and --volume for a mount without one)")
    mp = os.path.abspath(a.from_mount)
    t0 = time.monotonic()
    if a.volume:
        control.send(mp, f"volume {a.volume}")
    out = os.path.abspath(a.out)
    control.send(mp, f"flush {out}")
    pm = PageMap.load(out)
    res = {"pagemap": out, "seconds": round(time.monotonic() - t0, 3), **pm.counts()}
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"flushed {mp} in {res['seconds']:.2f}s: {res['pages_remote']} pages on disks, "
              f"{res['pages_zero']} zero\npage map: {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("capture", help="RAM -> migration volume + page map")
    c.add_argument("--from-mount", metavar="MNT",
                   help="a memfs mount that tracks its guest's writes (--new/--volume): it "
                        "writes back, copies its dirty pages and writes --out itself")
    c.add_argument("--ram", action="append", metavar="[NAME=]PATH",
                   help="a RAM file (/dev/shm/…, /proc/PID/fd/N); repeat for more regions")
    c.add_argument("--volume", metavar="URI", help="migration volume")
    c.add_argument("--out", required=True, metavar="PAGEMAP", help="page map to write")
    c.add_argument("--base", metavar="PAGEMAP", help="previous pass: rewrite changed pages only")
    c.add_argument("--view", metavar="PAGEMAP",
                   help="the RAM is a memfs mount's region: its view (written to .memfs/"
                        "control with 'save PATH'); pages it never served are not read")
    c.add_argument("--disk", metavar="URI", help="a disk whose blocks pages may refer to")
    c.add_argument("--index", metavar="INDEX", help="the index of --disk (memfs index)")
    c.add_argument("--disk-frozen", action="store_true",
                   help="the disk will not change although it is writable (a snapshot)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_capture)
