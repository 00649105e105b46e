"""``memfs umount``: stop a mount's daemon, or clean up after a dead one."""

from __future__ import annotations

import argparse


def cmd_umount(a: argparse.Namespace) -> int:
    """Stop the daemon (it stops its prefetch and unmounts), or clean up after
    a dead one; refused while a process maps a region (control.umount)."""
    from .. import control
    did = control.umount(a.mountpoint, force=a.force, timeout=a.timeout)
    if did:
        print(f"memfs: {did}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("umount", help="unmount and wait for the daemon to exit")
    u.add_argument("mountpoint")
    u.add_argument("-z", "--lazy", action="store_true",
                   help="accepted for compatibility: memfs always detaches lazily once "
                        "nothing maps a region")
    u.add_argument("--force", action="store_true",
                   help="unmount even while a process maps a region (it gets SIGBUS)")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    u.set_defaults(func=cmd_umount)
