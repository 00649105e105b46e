"""``memfs index``: hash a disk's blocks so that capture may refer to them."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _refuse_out_is_disk(disk_uri: str, out: str) -> None:
    """``--out`` must not be the disk itself (compared as files, not names)."""
    from ..disks import DiskError, parse_uri
    from ..index.format import DiskIndexError
    try:
        parsed = parse_uri(disk_uri)
        if parsed.scheme != "file":
            return
        a, b = os.stat(parsed.path), os.stat(out)
    except (DiskError, OSError):
        return
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        raise DiskIndexError(f"index {out} is the same file as disk {disk_uri}: refusing to "
                             "write into it")


def cmd_index(a: argparse.Namespace) -> int:
    import trio
    from ..index.build import build_index, changed_ranges_qcow2
    from ..index.format import DiskIndex, DiskIndexError
    base = None
    changed = None
    try:
        if a.base:
            base = DiskIndex.load(a.base)
        if a.changed_since:
            if base is None:
                print("memfs: --changed-since needs --base (the index of the backing chain)",
                      file=sys.stderr)
                return 2
            changed = changed_ranges_qcow2(a.changed_since)
    except DiskIndexError as e:
        print(f"memfs: base index: {e}", file=sys.stderr)
        return 1
    _refuse_out_is_disk(a.disk, a.out)
    index, res = trio.run(lambda: build_index(a.disk, base=base, changed=changed,
                                              progress=False if a.no_progress else None))
    try:
        index.save(a.out)
    except OSError as e:
        raise DiskIndexError(f"cannot write index {a.out}: {e.strerror}") from None
    res.index = a.out
    if a.json:
        print(json.dumps(res.as_dict(), indent=1))
    else:
        print(f"indexed {res.size} bytes of {res.disk} in {res.seconds:.2f}s ({res.mode}): "
              f"{res.entries} distinct blocks, {res.zero_blocks} zero blocks; read "
              f"{res.bytes_read / (1 << 20):.1f} MiB, hashed {res.blocks_hashed} blocks, "
              f"reused {res.chunks_reused} of {res.chunks_total} chunks")
        print(f"index: {a.out} ({os.path.getsize(a.out)} bytes)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="hash a disk's 4 KiB blocks for capture --disk/--index",
                       description="Hash every 4 KiB block of DISK (a path or an nbd:// URI) "
                                   "so that capture can refer to blocks instead of copying "
                                   "pages.")
    p.add_argument("disk", metavar="DISK", help="disk URI: a path, nbd://, nbd+unix://")
    p.add_argument("--out", required=True, metavar="INDEX", help="index file to write")
    p.add_argument("--base", metavar="INDEX",
                   help="an earlier index of this disk: re-hash only what changed")
    p.add_argument("--changed-since", metavar="OVERLAY.qcow2",
                   help="with --base: the disk is this qcow2 overlay over the chain --base "
                        "indexed; read only the ranges allocated in the overlay")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)
