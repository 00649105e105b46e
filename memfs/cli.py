"""The ``memfs`` command: capture, mount, load, umount, stats, …

Each sub-command is a small function that turns arguments into a call to the
layer that does the work, and turns that layer's one error type into a
message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
import time
import traceback
from typing import Any, Callable, NoReturn, Sequence

import trio

from . import __version__, control
from .capture import capture, parse_ram_args
from .detach import Ready, run_detached
from .daemon import Daemon, MountOptions, check_mountpoint
from .pagemap import PageMap
from .report import error_line, is_expected, parse_size, render_stats, unwrap
from .trace import Trace

log = logging.getLogger("memfs")

#: where daemons log by default: 0700, files 0600
RUN_DIR = "/run/memfs"


class UsageError(Exception):
    pass


def open_log(path: str) -> Any:
    """A log file that only its owner reads (paths and pids are in it), opened
    without following a link at its name."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a", buffering=1)


def setup_logging(debug: bool, logfile: str | None = None) -> None:
    handler: logging.Handler = logging.StreamHandler(open_log(logfile) if logfile
                                                     else sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


# -- capture -------------------------------------------------------------------

def cmd_capture(a: argparse.Namespace) -> int:
    if a.from_mount:
        return cmd_capture_from_mount(a)
    if not a.ram or not a.volume:
        raise UsageError("capture needs --ram and --volume (or --from-mount MNT)")
    referencer = None
    if a.disk or a.index:
        from .index import open_referencer  # issue 6: disk references
        if not (a.disk and a.index):
            raise UsageError("--disk and --index go together")
        referencer = open_referencer(a.disk, a.index, frozen=a.disk_frozen)
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


# -- mount -----------------------------------------------------------------------

def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ValueError("not an octal file mode (000 to 777)")
    return mode


def _option(flag: str, parse: Callable[[str], Any], text: str | None) -> Any:
    """A parsed option value; a value that does not parse is a usage error."""
    if not text:
        return None
    try:
        return parse(text)
    except ValueError as e:
        raise UsageError(f"{flag} {text}: {e}") from None


def mount_options(a: argparse.Namespace) -> MountOptions:
    pm = PageMap.load(a.pagemap) if a.pagemap else None
    regions: dict[str, int] = {}
    if a.new and (a.region or pm):
        raise UsageError("--new starts empty regions: give no page map and no --region")
    if a.new and not a.volume:
        raise UsageError("--new needs --volume URI: where the guest's pages are copied")
    for spec in (a.region or []) + (a.new or []):
        name, sep, size = spec.partition(":")
        if not sep:
            raise UsageError(f"--region {spec}: expected NAME:SIZE")
        try:
            regions[name] = parse_size(size)
        except ValueError as e:
            raise UsageError(f"--region {spec}: {e}") from None
    if pm and regions:
        raise UsageError("give a page map or --region, not both")
    return MountOptions(
        mountpoint=os.path.abspath(a.mountpoint), pagemap=pm, regions=regions,
        store_dir=a.store, allow_other=a.allow_other, debug_fuse=a.debug_fuse,
        read_ahead_kb=a.read_ahead_kb, max_read=a.max_read, fetch_retries=a.retries,
        mode=_option("--mode", _octal_mode, a.mode), bdi_max_ratio=a.bdi_max_ratio,
        bdi_strict_limit=a.bdi_strict_limit, prefetch=not a.no_prefetch, push=not a.no_push,
        prefetch_rate=_option("--prefetch-rate", parse_size, a.prefetch_rate),
        prefetch_trace=a.prefetch_trace, trace_out=a.trace_out,
        pagemap_path=os.path.abspath(a.pagemap) if a.pagemap else None,
        new=bool(a.new), volume=a.volume,
        sync_rate=_option("--sync-rate", parse_size, a.sync_rate),
        sync_paused=a.sync_paused, sync_interval=a.sync_interval,
        control_dirs=[os.path.abspath(d) for d in a.control_dir or []])


def cmd_mount(a: argparse.Namespace) -> int:
    if a.pagemap and not os.path.isfile(a.pagemap) and os.path.isdir(a.pagemap) \
            and a.mountpoint is None:
        a.pagemap, a.mountpoint = None, a.pagemap
    if a.state or a.supervise or a.resume:  # a connection that outlives the daemon
        from . import supervisor
        return supervisor.mount(a, mount_options, check_mountpoint)
    if a.mountpoint is None:
        raise UsageError("no mount point given")
    opts = mount_options(a)
    check_mountpoint(opts.mountpoint)
    if opts.prefetch_trace:
        Trace.load(opts.prefetch_trace)  # a clear error now, not in the daemon's log

    if a.foreground:
        setup_logging(a.debug, a.log)
        trio.run(Daemon(opts).run)
        return 0
    return _daemonize(opts, a)


def _daemonize(opts: MountOptions, a: argparse.Namespace) -> int:
    logfile = a.log or os.path.join(
        RUN_DIR, opts.mountpoint.strip("/").replace("/", "-") + ".log")
    if not a.log:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(RUN_DIR)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise UsageError(f"{RUN_DIR} is not a directory of uid {os.getuid()}: not logging "
                             "there (give --log FILE)")
        os.chmod(RUN_DIR, 0o700)
    open_log(logfile).close()  # a bad log path is an error here, not a silent daemon death

    def work(ready: Ready) -> int:
        trio.run(Daemon(opts).run, lambda: ready(str(os.getpid())))
        return 0
    ok, msg = run_detached(work, logfile, a.debug)
    if ok:
        print(f"memfs: mounted {opts.mountpoint} (pid {msg}, log {logfile})")
        return 0
    print(f"memfs: mount failed: {msg or 'daemon died; see ' + logfile}", file=sys.stderr)
    return 1


# -- load / umount / stats ---------------------------------------------------------

def cmd_load(a: argparse.Namespace) -> int:
    PageMap.load(a.pagemap)  # a clear error here rather than a bare EINVAL later
    control.load(a.mountpoint, os.path.abspath(a.pagemap))
    print(f"memfs: page map {a.pagemap} installed on {a.mountpoint}")
    return 0


def cmd_save(a: argparse.Namespace) -> int:
    control.save(a.mountpoint, os.path.abspath(a.out))
    print(f"memfs: the view of {a.mountpoint} is in {a.out} (capture --view {a.out})")
    return 0


def cmd_umount(a: argparse.Namespace) -> int:
    """Stop the daemon (it stops its prefetch and unmounts), or clean up after
    a dead one; refused while a process maps a region (control.umount)."""
    did = control.umount(a.mountpoint, force=a.force, timeout=a.timeout)
    if did:
        print(f"memfs: {did}")
    return 0




def cmd_stats(a: argparse.Namespace) -> int:
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


# -- parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memfs", description="Lazy guest RAM for live migration.")
    p.add_argument("--version", action="version", version=f"memfs {__version__}")
    p.add_argument("--debug", action="store_true", help="verbose logging")
    sub = p.add_subparsers(dest="command", required=True)

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
    m.add_argument("--store", metavar="DIR", help="local store directory (default: temporary)")
    m.add_argument("--state", metavar="DIR",
                   help="keep the mount's state (page map, journal, store) in DIR and hold "
                        "its FUSE connection in a supervisor that restarts a dead daemon")
    m.add_argument("--supervise", action="store_true",
                   help="--state in /var/lib/memfs/<mount point>")
    m.add_argument("--resume", metavar="STATE",
                   help="continue the mount whose state is STATE: restart its daemon "
                        "(live upgrade) if its supervisor runs, else mount it again")
    m.add_argument("--read-ahead-kb", type=int, metavar="KB", help="bdi read-ahead")
    m.add_argument("--max-read", type=int, metavar="BYTES", help="largest READ the kernel sends")
    m.add_argument("--bdi-max-ratio", type=int, metavar="PCT", default=50,
                   help="the mount's share of the dirty page limit (50; FUSE's own is 1)")
    m.add_argument("--bdi-strict-limit", type=int, choices=(0, 1), default=0,
                   help="1 holds writers to max-ratio strictly (0; FUSE's own is 1)")
    m.add_argument("--retries", type=int, default=3, help="fetch retries before EIO (3)")
    m.add_argument("--no-prefetch", action="store_true",
                   help="no background completion: pages come only on demand")
    m.add_argument("--no-push", action="store_true",
                   help="prefetch into the local store only, not into the page cache")
    m.add_argument("--prefetch-rate", metavar="BYTES/S",
                   help="limit background fetching (e.g. 200M)")
    m.add_argument("--prefetch-trace", metavar="FILE",
                   help="a working-set trace of an earlier mount: fetch its pages first")
    m.add_argument("--trace-out", metavar="FILE",
                   help="where the working-set trace goes at unmount (PAGEMAP.trace)")
    m.add_argument("--log", metavar="FILE", help="log file (daemon default /run/memfs/…)")
    m.add_argument("--control-dir", action="append", metavar="DIR",
                   help="the only directory control commands (save, trace, flush) may write "
                        "to; repeat for more (default: the page map's and the store's, and "
                        "directories only root or the owner can write)")
    m.set_defaults(func=cmd_mount)

    lo = sub.add_parser("load", help="hand a page map to a waiting mount")
    lo.add_argument("mountpoint")
    lo.add_argument("pagemap")
    lo.set_defaults(func=cmd_load)

    sv = sub.add_parser("save", help="write a mount's view, for an onward capture --view")
    sv.add_argument("mountpoint")
    sv.add_argument("out", metavar="PAGEMAP")
    sv.set_defaults(func=cmd_save)

    u = sub.add_parser("umount", help="unmount and wait for the daemon to exit")
    u.add_argument("mountpoint")
    u.add_argument("-z", "--lazy", action="store_true",
                   help="accepted for compatibility: memfs always detaches lazily once "
                        "nothing maps a region")
    u.add_argument("--force", action="store_true",
                   help="unmount even while a process maps a region (it gets SIGBUS)")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    u.set_defaults(func=cmd_umount)

    s = sub.add_parser("stats", help="show a mount's statistics")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true", help="raw JSON")
    s.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                   help="refresh in place")
    s.set_defaults(func=cmd_stats)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


#: other modules' sub-commands (index, migrate) register here
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _load_extras() -> None:
    for mod in ("memfs.index", "memfs.qemu.migrate", "memfs.qemu.snapshot",
                "memfs.qemu.restore"):
        try:
            module = __import__(mod, fromlist=["add_parser"])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        if hasattr(module, "add_parser"):
            _EXTRA_COMMANDS.append(module.add_parser)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"memfs: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Expected failures (OSError, any layer's error type) are one line
    ``memfs: …`` and exit status 1, usage errors 2; anything else is a bug
    and keeps its traceback."""
    _load_extras()
    a = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging(a.debug)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        return 130
    except BaseException as group:
        e = unwrap(group)
        if isinstance(e, KeyboardInterrupt):
            return 130
        if isinstance(e, UsageError):
            print(f"memfs: {error_line(e)}", file=sys.stderr)
            return 2
        if is_expected(e):
            print(f"memfs: {error_line(e)}", file=sys.stderr)
            return 1
        if not isinstance(e, Exception):
            raise
        traceback.print_exception(group)
        print(f"memfs: BUG: unexpected {type(e).__name__}: {error_line(e)} (the traceback "
              "above; please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
