"""``memfs mount``: serve regions over FUSE (the arguments; memfs.cli.mount_run
does the work, imported only when the command runs)."""

from __future__ import annotations

import argparse


def cmd_mount(a: argparse.Namespace) -> int:
    from .mount_run import run
    return run(a)


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("mount", help="serve regions over FUSE")
    m.add_argument("pagemap", nargs="?", help="page map (omit with --region to load later)")
    m.add_argument("mountpoint", nargs="?")
    m.add_argument("--region", action="append", metavar="NAME:SIZE",
                   help="serve a region before its page map arrives (memfs load)")
    m.add_argument("--new", action="append", metavar="NAME:SIZE",
                   help="a region that starts as zero pages, for a guest that boots on "
                        "the mount (a migration source); needs --volume")
    m.add_argument("--volume", metavar="URI",
                   help="copy the pages the guest writes to this volume in the background "
                        "(memfs capture --from-mount, memfs migrate)")
    m.add_argument("--sync-rate", metavar="BYTES/S",
                   help="limit that background copy (e.g. 100M; control: sync-rate)")
    m.add_argument("--sync-interval", type=float, default=1.0, metavar="S",
                   help="seconds between background passes: write-back, then copy (1)")
    m.add_argument("--sync-paused", action="store_true",
                   help="start with the background copy paused (control: sync-resume)")
    m.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    m.add_argument("--debug-fuse", action="store_true", help="libfuse debug output")
    m.add_argument("--allow-other", action="store_true", help="let other users (qemu) in")
    m.add_argument("--mode", default="600", help="octal mode of region files (600)")
    m.add_argument("--store", metavar="DIR",
                   help="local store directory (default: unnamed files in /var/tmp)")
    _add_state_options(m)
    m.add_argument("--read-ahead-kb", type=int, metavar="KB", help="bdi read-ahead")
    m.add_argument("--max-read", type=int, metavar="BYTES", help="largest READ the kernel sends")
    m.add_argument("--bdi-max-ratio", type=int, metavar="PCT", default=50,
                   help="the mount's share of the dirty page limit (50; FUSE's own is 1)")
    m.add_argument("--bdi-strict-limit", type=int, choices=(0, 1), default=0,
                   help="1 holds writers to max-ratio strictly (0; FUSE's own is 1)")
    m.add_argument("--retries", type=int, default=3, help="fetch retries before EIO (3)")
    _add_prefetch_options(m)
    m.add_argument("--log", metavar="FILE", help="log file (daemon default /run/memfs/…)")
    m.add_argument("--control-dir", action="append", metavar="DIR",
                   help="the only directory control commands (save, trace, flush) may write "
                        "to; repeat for more (default: the page map's and the store's, and "
                        "directories only root or the owner can write)")
    m.set_defaults(func=cmd_mount)


def _add_state_options(m: argparse.ArgumentParser) -> None:
    m.add_argument("--state", metavar="DIR",
                   help="keep the mount's state (page map, journal, store) in DIR and hold "
                        "its FUSE connection in a supervisor that restarts a dead daemon")
    m.add_argument("--supervise", action="store_true",
                   help="--state in /var/lib/memfs/<mount point>")
    m.add_argument("--resume", metavar="STATE",
                   help="continue the mount whose state is STATE: restart its daemon "
                        "(live upgrade) if its supervisor runs, else mount it again")


def _add_prefetch_options(m: argparse.ArgumentParser) -> None:
    m.add_argument("--no-prefetch", action="store_true",
                   help="no background completion: pages come only on demand")
    m.add_argument("--no-push", action="store_true",
                   help="prefetch into the local store only, not into the page cache")
    m.add_argument("--prefetch-rate", metavar="BYTES/S",
                   help="limit background fetching (e.g. 200M)")
    m.add_argument("--prefetch-delay", type=float, metavar="SECONDS",
                   help="start the background completion only after the first READ and "
                        "then a pause of SECONDS in the READs: the guests' first faults "
                        "go first (at most 10 x SECONDS after the first READ)")
    m.add_argument("--prefetch-trace", metavar="FILE",
                   help="a working-set trace of an earlier mount: fetch its pages first")
    m.add_argument("--trace-out", metavar="FILE",
                   help="where the working-set trace goes at unmount (PAGEMAP.trace)")
