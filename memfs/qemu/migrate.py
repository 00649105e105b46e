"""``memfs migrate``: live-migrate a running QEMU guest onto a memfs mount.

The source guest's RAM is a shared file (a /dev/shm file, /proc/PID/fd/N of a
memfd, or a file in another memfs mount); the destination QEMU, started with
``-incoming defer``, maps a file of a memfs mount that waits for its page map
(``memfs mount --region NAME:SIZE``).  The steps:

1. capture passes while the source runs (pass 2+ rewrite changed pages only);
2. ``stop`` the source (the downtime starts here); then, at the same time:
   the final pass and the hand-over of the page map to the destination's
   mount (control ``load``), and the device state alone (capability
   ``x-ignore-shared`` on both sides keeps the shared RAM out of the stream;
   the destination's reads of RAM wait for the page map);
3. ``cont`` the destination once both are done; the source may be
   switched off.

If the source RAM is itself served by memfs (a guest that booted on a
``memfs mount --new`` source mount, or one that came here the same way), no
pass reads RAM: the mount knows from the kernel's write-back which pages the
guest wrote and copies them to its volume (memfs.sync, memfs.qemu.passes).
A pass is ``sync`` (write back, copy what is dirty); the final one, with the
source stopped, is ``flush`` (the same plus the page map), so the downtime is
what the guest dirtied since the last pass, not its RAM size.  Pages the
mount never had keep their location on the disk they came from.

With ``--disk URI --index INDEX`` (``memfs index``), every capture pass
refers to the guest's disk for pages whose bytes equal one of its 4 KiB
blocks (the guest's page cache of that disk) instead of writing them to the
volume.  The disk must not change while the page map refers to it: freeze it
first (docs/disk-references.rst), and serve it read-only, or pass
``--disk-frozen``.  The destination's mount reads those pages from the disk.

If anything fails before the destination runs, the source is resumed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import trio

from .. import control
from ..capture_types import CaptureError, Referencer
from ..index.referencer import aopen_referencer
from .passes import MountPasses, PassError, ReadPasses
from .plain import MigrationWatch, StreamCounter, migrate_incoming, set_capabilities
from .qmp import QMP, QMPError, unwrap_single

__all__ = ["MigrateError", "MigrateOptions", "MigrateReport", "migrate"]

log = logging.getLogger("memfs.migrate")


class MigrateError(Exception):
    """The migration failed; the message says at which step and why."""


@dataclass
class MigrateOptions:
    source_qmp: str | None
    rams: list[tuple[str, str]]         # (region name, RAM file on the source)
    volume: str | None                  # migration volume URI (None: the source mount's)
    pagemap: str                        # page map to write (read by the destination)
    dest_qmp: str | None
    dest_mount: str
    #: capture passes while the source runs, before the final (stopped) pass
    passes: int = 1
    #: where the destination listens (migrate-incoming); None: a unix socket in
    #: a temporary directory (both QEMUs on this host), with the stream counted
    incoming_uri: str | None = None
    #: where the source connects (migrate); None: incoming_uri
    outgoing_uri: str | None = None
    quit_source: bool = False
    timeout: float = 300.0
    #: a frozen disk of the guest and its index (memfs index): pages equal to
    #: one of its blocks are referenced there instead of written to the volume
    disk: str | None = None
    index: str | None = None
    disk_frozen: bool = False


@dataclass
class MigrateReport:
    #: from ``stop`` on the source to the destination running
    downtime_ms: float = 0.0
    #: from the first capture pass to the destination running
    total_ms: float = 0.0
    #: from the first capture pass until the source had nothing left to give
    #: (device state sent, every page on the volume): it may be switched off
    src_free_ms: float = 0.0
    volume_bytes: int = 0
    #: the volume the pages went to
    volume: str = ""
    #: (source on memfs) bytes its mount copied to the volume before the
    #: migration started, in the background while the guest ran
    volume_bytes_before: int = 0
    #: pages referenced on the disk (--disk/--index) instead of written, all passes
    pages_referenced: int = 0
    #: bytes in the migration stream: counted on the wire when memfs runs the
    #: socket, else QEMU's own count (query-migrate ram.transferred)
    stream_bytes: int = 0
    stream_counted: bool = False
    pages_remote_at_resume: int = 0
    pages_total: int = 0
    final_pass_ms: float = 0.0
    device_ms: float = 0.0
    qemu_downtime_ms: float | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    #: milliseconds from the start to the end of each step
    steps_ms: dict[str, float] = field(default_factory=dict)
    #: host monotonic time of the start (the first capture pass), to line up
    #: the report with other clocks
    started: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        mib = 1 << 20
        lines = [f"downtime      {self.downtime_ms:9.1f} ms  (final pass {self.final_pass_ms:.1f} ms,"
                 f" device state {self.device_ms:.1f} ms)",
                 f"total time    {self.total_ms:9.1f} ms",
                 f"source free   {self.src_free_ms:9.1f} ms after the start",
                 f"volume        {self.volume_bytes / mib:9.1f} MiB written"
                 + (f" ({self.pages_referenced} pages referenced on the disk)"
                    if self.pages_referenced else ""),
                 f"stream        {self.stream_bytes / mib:9.3f} MiB"
                 + ("" if self.stream_counted else " (QEMU's count)"),
                 f"remote pages  {self.pages_remote_at_resume:9d} of {self.pages_total} at resume"]
        for i, p in enumerate(self.passes, 1):
            lines.append(f"  pass {i}{' (final)' if i == len(self.passes) else '        '}: "
                         f"{p['seconds'] * 1000:8.1f} ms, {p['pages_written']} written, "
                         f"{p['pages_unchanged']} unchanged, {p['pages_kept']} kept remote, "
                         f"{p.get('pages_referenced', 0)} referenced, {p['pages_zero']} zero")
        return "\n".join(lines)


def _source_mount(rams: Sequence[tuple[str, str]]) -> str | None:
    """The memfs mount serving the source RAM files, if they are in one."""
    roots = {control.mount_root(path) for _, path in rams}
    if len(roots) > 1:
        raise MigrateError("the RAM files are in different places: " + ", ".join(
            str(r or "not in a memfs mount") for r in roots))
    return roots.pop()


def _check_destination(opts: MigrateOptions, sizes: dict[str, int]) -> int:
    """Before touching the source: the destination mount waits for a map with
    exactly these regions.  Returns its page count."""
    try:
        st = control.read_stats(opts.dest_mount)
    except OSError as e:
        raise MigrateError(f"{opts.dest_mount} is not a memfs mount: {e.strerror}") from None
    if st.get("pagemap_installed"):
        raise MigrateError(f"{opts.dest_mount} already serves a page map; mount it with "
                           "--region NAME:SIZE so that it waits for one")
    for name, size in sizes.items():
        try:
            have = os.stat(os.path.join(opts.dest_mount, name)).st_size
        except OSError:
            raise MigrateError(f"{opts.dest_mount} serves no region {name!r}") from None
        if have != size:
            raise MigrateError(f"region {name}: {size} bytes on the source, {have} in "
                               f"{opts.dest_mount}")
    return int(st.get("pages_total", 0))


async def migrate(opts: MigrateOptions, src: QMP | None = None,
                  dst: QMP | None = None) -> MigrateReport:
    """Run the whole migration; see the module doc.  ``src``/``dst``: QMP
    sessions already open to the two QEMUs (a QMP socket serves one client at
    a time); otherwise memfs connects to ``opts.source_qmp``/``dest_qmp``."""
    if opts.passes < 0:
        raise MigrateError("--passes must be 0 or more")
    if (opts.disk is None) != (opts.index is None):
        raise MigrateError("--disk and --index go together")
    sizes = {}
    for name, path in opts.rams:
        try:
            sizes[name] = os.stat(path).st_size
        except OSError as e:
            raise MigrateError(f"cannot stat RAM {path}: {e.strerror}") from None
    src_mount = await trio.to_thread.run_sync(_source_mount, opts.rams)
    rep = MigrateReport()
    rep.pages_total = await trio.to_thread.run_sync(_check_destination, opts, sizes)
    with tempfile.TemporaryDirectory(prefix="memfs-migrate-") as tmp, unwrap_single():
        async with trio.open_nursery() as nursery:
            incoming, outgoing, counter = opts.incoming_uri, opts.outgoing_uri, None
            if incoming is None:
                incoming = f"unix:{tmp}/incoming.sock"
                counter = StreamCounter(f"{tmp}/source.sock", f"{tmp}/incoming.sock")
                await nursery.start(counter.run)
                outgoing = outgoing or f"unix:{counter.listen}"
            outgoing = outgoing or incoming
            try:
                async with AsyncExitStack() as stack:
                    ref = None
                    if opts.disk is not None and opts.index is not None:
                        try:
                            ref = await aopen_referencer(opts.disk, opts.index,
                                                         opts.disk_frozen)
                        except CaptureError as e:
                            raise MigrateError(f"disk references: {e}") from None
                        stack.push_async_callback(ref.aclose)
                    if src is None:
                        src = await stack.enter_async_context(QMP.connect(opts.source_qmp))
                    if dst is None:
                        dst = await stack.enter_async_context(QMP.connect(opts.dest_qmp))
                    await _run(opts, rep, src, dst, src_mount, incoming, outgoing, tmp, ref)
            except QMPError as e:
                raise MigrateError(str(e)) from None
            if counter is not None:
                rep.stream_bytes, rep.stream_counted = counter.sent, True
            nursery.cancel_scope.cancel()
    return rep


async def _run(opts: MigrateOptions, rep: MigrateReport, src: QMP, dst: QMP,
               src_mount: str | None, incoming: str, outgoing: str, tmp: str,
               ref: Referencer | None = None) -> None:
    status = (await dst.execute("query-status"))["status"]
    if status != "inmigrate":
        raise MigrateError(f"the destination QEMU is {status!r}, not waiting for a "
                           "migration (start it with -incoming defer)")
    if (await src.execute("query-status"))["status"] != "running":
        raise MigrateError("the source QEMU is not running")
    # everything that does not need the source stopped happens first
    for q in (src, dst):
        await set_capabilities(q, x_ignore_shared=True)
    await migrate_incoming(dst, incoming)
    run = _Run(opts, rep, src, dst, outgoing)
    await run.choose_passes(src_mount, tmp, ref)
    for i in range(opts.passes):
        await run.one_pass(i)
        run.mark(f"pass{i + 1}")
    await run.switch_over()
    await run.after()


class _Run:
    """One migration from the first pass on: the steps share the options, the
    report, both QMP sessions and the clock."""

    def __init__(self, opts: MigrateOptions, rep: MigrateReport, src: QMP, dst: QMP,
                 outgoing: str) -> None:
        self.opts, self.rep, self.src, self.dst, self.outgoing = opts, rep, src, dst, outgoing
        self.t0 = rep.started = time.monotonic()
        self.t_stop = self.t0
        self.passes: ReadPasses | MountPasses | None = None

    def mark(self, step: str) -> None:
        self.rep.steps_ms[step] = round((time.monotonic() - self.t0) * 1000, 1)

    async def choose_passes(self, src_mount: str | None, tmp: str,
                            ref: Referencer | None) -> None:
        """Ask the source's mount, or read RAM (needs a volume)."""
        opts, rep = self.opts, self.rep
        if src_mount and ref is None:
            passes = MountPasses(src_mount, opts.volume, opts.dest_mount, tmp, opts.passes)
            try:
                rep.volume = await passes.prepare()
            except PassError as e:
                raise MigrateError(str(e)) from None
            rep.volume_bytes_before = passes.bytes_before
            self.passes = passes
            return
        if not opts.volume:
            raise MigrateError("--volume is needed: the source RAM is not a memfs mount "
                               "that copies its pages to a volume")
        self.passes = ReadPasses(opts.rams, opts.volume, tmp, ref, view_mount=src_mount)
        rep.volume = opts.volume

    async def one_pass(self, i: int) -> None:
        final = i == self.opts.passes
        assert self.passes is not None
        try:
            res = await self.passes.run(i, self.opts.pagemap if final else None)
        except PassError as e:
            raise MigrateError(f"capture pass {i + 1}: {e}") from None
        self.rep.passes.append(res)
        if "bytes_written" in res:
            self.rep.volume_bytes += res["bytes_written"]
            self.rep.pages_referenced += res.get("pages_referenced", 0)
        log.info("pass %d%s: %.3fs %s", i + 1, " (final)" if final else "", res["seconds"],
                 {k: v for k, v in res.items() if k.startswith("pages_")})

    async def switch_over(self) -> None:
        """Stop the source, then the final pass and the device state at once
        (the downtime is the longer of the two, not their sum), then run the
        destination.  A failure before that resumes the source."""
        stopped = resumed = False
        try:
            await self.src.execute("stop")
            stopped = True
            self.t_stop = time.monotonic()
            self.mark("stopped")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pages)
                nursery.start_soon(self.devices)
            # free once the device state is sent and every page is on the volume
            steps = self.rep.steps_ms
            self.rep.src_free_ms = max(steps["source_done"], steps["final_pass"])
            await self.dst.execute("cont")
            resumed = True
            t_run = time.monotonic()
            self.mark("running")
        except BaseException:
            if stopped and not resumed:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    try:
                        await self.src.execute("cont")
                        log.error("migration failed: the source runs again")
                    except Exception as e:
                        log.error("migration failed and the source could not be resumed: %s",
                                  e)
            raise
        self.rep.downtime_ms = round((t_run - self.t_stop) * 1000, 1)
        self.rep.total_ms = round((t_run - self.t0) * 1000, 1)

    async def pages(self) -> None:
        """The final pass and the hand-over of the page map."""
        assert self.passes is not None
        await self.one_pass(self.opts.passes)
        self.mark("final_pass")
        self.rep.final_pass_ms = round((time.monotonic() - self.t_stop) * 1000, 1)
        try:
            await self.passes.hand_over(self.opts.dest_mount, self.opts.pagemap)
        except (control.ControlError, OSError) as e:
            raise MigrateError(f"the destination mount refused the page map: {e}") from None
        self.mark("loaded")

    async def devices(self) -> None:
        """The device state, meanwhile: the shared RAM is not in the stream,
        and a READ of the destination's RAM before its page map arrives
        waits for it (DESIGN.md invariant 4)."""
        rep, timeout = self.rep, self.opts.timeout
        watch = MigrationWatch(started=self.t_stop)
        await self.src.execute("migrate", {"uri": self.outgoing})
        await watch.until(self.src, timeout=timeout, interval=0.005)
        self.mark("source_done")
        rep.qemu_downtime_ms = watch.info.get("downtime")
        if not rep.stream_counted:
            rep.stream_bytes = int(watch.info.get("ram", {}).get("transferred", 0))
        with trio.fail_after(timeout):
            while (await self.dst.execute("query-status"))["status"] == "inmigrate":
                await trio.sleep(0.005)
        rep.device_ms = round((time.monotonic() - self.t_stop) * 1000, 1)
        self.mark("destination_loaded")

    async def after(self) -> None:
        """The guest runs on the destination: the record, and the source quits."""
        opts, rep, passes = self.opts, self.rep, self.passes
        if isinstance(passes, MountPasses):  # the final pass's figures, now that it is over
            await passes.account(rep.passes[-1])
            try:
                await passes.finish(opts.pagemap)
            except PassError as e:
                log.warning("the guest runs on the destination, but the page map for the "
                            "record was not written: %s", e)
            rep.volume_bytes += rep.passes[-1]["bytes_written"]
        st = await trio.to_thread.run_sync(control.read_stats, opts.dest_mount)
        rep.pages_remote_at_resume = int(st.get("pages_remote", 0))
        if opts.quit_source:
            try:
                await self.src.execute("quit", timeout=5)
            except Exception as e:
                log.warning("quitting the source: %s", e)
