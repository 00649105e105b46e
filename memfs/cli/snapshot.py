"""``memfs snapshot``: save a running QEMU guest (memfs.qemu.snapshot does it)."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_snapshot(a: argparse.Namespace) -> int:
    import trio
    from ..capture_types import parse_ram_args
    from ..qemu.qmp import QMPError
    from ..qemu.snapshot import SnapshotOptions, snapshot
    from ..snapshot import SnapshotError
    opts = SnapshotOptions(qmp=a.qmp, rams=parse_ram_args(a.ram), volume=a.volume,
                           out=a.out, resume=a.resume, timeout=a.timeout)
    try:
        rep = trio.run(snapshot, opts)
    except trio.TooSlowError:
        print("memfs: snapshot failed: timed out (QEMU's QMP socket or the device state; "
              "a QMP socket serves one client at a time)", file=sys.stderr)
        return 1
    except (SnapshotError, QMPError, OSError, RuntimeError) as e:
        print(f"memfs: snapshot failed: {e or type(e).__name__}", file=sys.stderr)
        return 1
    print(json.dumps(rep.__dict__, indent=1))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "snapshot", help="save a running QEMU guest to a snapshot directory",
        description="Copy the guest's RAM to a volume (on a memfs source mount without "
        "reading RAM), pause it for the final pass and its device state (x-ignore-shared), "
        "and write DIR/manifest.json naming every file with its checksum.")
    p.add_argument("--qmp", required=True, metavar="SOCK", help="the QEMU's QMP socket")
    p.add_argument("--ram", action="append", required=True, metavar="[NAME=]PATH",
                   help="the guest's RAM file (a shared memory backend); repeat per region")
    p.add_argument("--volume", required=True, metavar="URI",
                   help="the snapshot's own volume (a new file or an NBD export)")
    p.add_argument("--out", required=True, metavar="DIR", help="snapshot directory (new or empty)")
    p.add_argument("--resume", action="store_true", help="let the guest run on afterwards")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds for the device state (300)")
    p.set_defaults(func=cmd_snapshot)
