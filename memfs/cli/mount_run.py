"""``memfs mount``'s work: options -> MountOptions, then the daemon in the
foreground, detached, or under a supervisor that holds its FUSE connection.

Why apart from memfs.cli.mount: every command's declarations are imported
for every command, and the daemon's imports (trio, pyfuse3) would add a
tenth of a second to each, ``memfs restore --pool`` included."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from dataclasses import fields
from typing import Any

import trio

from ..daemon import Daemon
from ..mountopts import MountOptions, check_mountpoint
from ..detach import Ready, run_detached
from ..fileio import PRIVATE, create_new
from ..logs import RUN_DIR, open_log, setup_logging
from ..pagemap import PageMap
from ..report import error_line, is_expected, parse_size, unwrap
from ..state import State, default_dir
from ..supervisor import SOCKET, Supervisor, SupervisorError, ask
from ..takeover import TakeoverError, detach, mount_fuse, read_init
from ..trace import Trace
from .common import UsageError, option

log = logging.getLogger("memfs.supervisor")


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ValueError("not an octal file mode (000 to 777)")
    return mode


def _regions(a: argparse.Namespace, pm: PageMap | None) -> dict[str, int]:
    """--region and --new as {name: size}, checked against the page map."""
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
    return regions


def mount_options(a: argparse.Namespace) -> MountOptions:
    pm = PageMap.load(a.pagemap) if a.pagemap else None
    regions = _regions(a, pm)
    return MountOptions(
        mountpoint=os.path.abspath(a.mountpoint), pagemap=pm, regions=regions,
        store_dir=a.store, allow_other=a.allow_other, debug_fuse=a.debug_fuse,
        read_ahead_kb=a.read_ahead_kb, max_read=a.max_read, fetch_retries=a.retries,
        mode=option("--mode", _octal_mode, a.mode), bdi_max_ratio=a.bdi_max_ratio,
        bdi_strict_limit=a.bdi_strict_limit, prefetch=not a.no_prefetch, push=not a.no_push,
        prefetch_rate=option("--prefetch-rate", parse_size, a.prefetch_rate),
        prefetch_trace=a.prefetch_trace, trace_out=a.trace_out,
        prefetch_delay=a.prefetch_delay,
        pagemap_path=os.path.abspath(a.pagemap) if a.pagemap else None,
        new=bool(a.new), volume=a.volume,
        sync_rate=option("--sync-rate", parse_size, a.sync_rate),
        sync_paused=a.sync_paused, sync_interval=a.sync_interval,
        control_dirs=[os.path.abspath(d) for d in a.control_dir or []])


def run(a: argparse.Namespace) -> int:
    if a.pagemap and not os.path.isfile(a.pagemap) and os.path.isdir(a.pagemap) \
            and a.mountpoint is None:
        a.pagemap, a.mountpoint = None, a.pagemap
    if a.state or a.supervise or a.resume:  # a connection that outlives the daemon
        return _mount_supervised(a)
    if a.mountpoint is None:
        raise UsageError("no mount point given")
    opts = mount_options(a)
    check_mountpoint(opts.mountpoint)
    if opts.prefetch_trace:
        Trace.load(opts.prefetch_trace)  # a clear error now, not in the daemon's log

    if a.foreground:
        setup_logging(a.debug, a.log)
        try:
            trio.run(Daemon(opts).run)
        except Exception as e:
            if a.log:  # main() tells stderr; an operator reads the log file
                _log_fatal(e)
            raise
        return 0
    return _daemonize(opts, a)


def _log_fatal(e: BaseException) -> None:
    """The error that stops a foreground daemon, in its log file too: with
    --log, stderr is often a pipe nobody reads (a test harness, a service
    manager's journal apart from the log)."""
    err = unwrap(e)
    if is_expected(err):
        logging.getLogger("memfs.daemon").critical("stopped: %s", error_line(err))
    else:
        logging.getLogger("memfs.daemon").critical("stopped by a bug: %s", error_line(err),
                                                   exc_info=err)


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


# -- with a state directory: a supervisor holds the connection -----------------------

def _saved_options(opts: Any) -> dict[str, Any]:
    """MountOptions fields worth keeping in meta.json (plain values only)."""
    out = {}
    for f in fields(opts):
        v = getattr(opts, f.name)
        if f.name in ("pagemap", "mountpoint", "regions", "state_dir"):
            continue
        if v is None or isinstance(v, (str, int, float, bool)) or \
                (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            out[f.name] = v
    return out


def _mount_supervised(a: argparse.Namespace) -> int:
    """``memfs mount`` with a state directory: print one line, exit 0 or 1."""
    if a.resume:
        state = State.open(a.resume)
        if os.path.exists(os.path.join(state.path, SOCKET)):
            try:
                reply = ask(state.path, "restart")
            except SupervisorError:
                reply = ""
            if reply:
                print(f"memfs: daemon of {state.mountpoint} restarted ({reply[3:]})")
                return 0
        state.lock()
        resumed = True
    else:
        if a.mountpoint is None:
            raise SupervisorError("no mount point given")
        opts = mount_options(a)
        if opts.pagemap is None and not opts.regions:
            raise SupervisorError("nothing to serve: no page map and no --region")
        sizes = ({r.name: r.size for r in opts.pagemap.regions} if opts.pagemap
                 else dict(opts.regions))
        check_mountpoint(opts.mountpoint)
        state = State.create(a.state or default_dir(opts.mountpoint), opts.mountpoint,
                             sizes, _saved_options(opts))
        if opts.pagemap is not None:
            state.save_pagemap(opts.pagemap)
        resumed = False
    try:
        code = _supervise(a, state, resumed)
    except BaseException:
        if not resumed:
            state.discard()  # nothing served: the same command can run again
        raise
    if code and not resumed:
        state.discard()
    return code


def _supervise(a: argparse.Namespace, state: State, resumed: bool) -> int:
    mp = state.mountpoint
    check_mountpoint(mp)
    meta_opts = state.meta.get("options", {})
    try:
        fuse_fd = mount_fuse(mp, allow_other=bool(meta_opts.get("allow_other")),
                             max_read=meta_opts.get("max_read"))
    except TakeoverError as e:
        raise SupervisorError(str(e)) from None
    os.set_inheritable(fuse_fd, True)
    try:
        init_msg = read_init(fuse_fd)
    except (OSError, TakeoverError) as e:
        detach(mp)
        raise SupervisorError(f"{mp}: {e}") from None
    logfile = a.log or (None if a.foreground else os.path.join(state.path, "memfs.log"))
    sup = Supervisor(state, fuse_fd, init_msg, resumed=resumed, log_path=logfile,
                     debug=a.debug)
    if a.foreground:
        setup_logging(a.debug, logfile)
        return sup.run(lambda pid: log.info("serving %s (daemon %s)", mp, pid))
    return _background(sup, logfile or "", a.debug)


def _background(sup: Supervisor, logfile: str, debug: bool) -> int:
    """Run the supervisor detached; report the first daemon's start here."""
    if not os.path.exists(logfile):
        os.close(create_new(logfile, PRIVATE, os.O_WRONLY))
    ok, msg = run_detached(sup.run, logfile, debug)
    if ok:
        print(f"memfs: mounted {sup.state.mountpoint} (daemon {msg}, "
              f"state {sup.state.path}, log {logfile})")
        return 0
    print(f"memfs: mount failed: {msg or 'supervisor died; see ' + logfile}", file=sys.stderr)
    return 1
