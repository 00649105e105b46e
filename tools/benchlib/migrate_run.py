"""bench-migrate: one method's run (the running source and what a method
needs), and the destination and source events a row records."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import trio

from memfs.qemu import VM
from memfs.qemu.guest import GuestImage, guest_config
from memfs.qemu.plain import MigrationWatch, StreamCounter, migrate_incoming

from benchlib import rigstate
from benchlib.guestdisk import disk_args

MIB = 1 << 20


@dataclass
class Run:
    """One method's run: the running source and what a method needs."""

    args: argparse.Namespace
    image: GuestImage
    workdir: Path            # sockets, consoles, logs
    shm: Path                # tmpfs directory for RAM files
    src: VM
    src_ram: Path
    nursery: trio.Nursery
    metrics: dict[str, Any] = field(default_factory=dict)
    t_migrate: float = 0.0   # host monotonic time of the migrate command
    #: the guest's disk (qcow2), if --disk; the destination's disk unless
    #: dest_disk says otherwise (memfs+refs: the overlay of the frozen image)
    disk: Path | str | None = None
    dest_disk: Path | None = None
    #: the source's RAM is this memfs source mount's region (memfs-source)
    src_mount: Path | None = None

    def dest_config(self, memory: dict[str, Any], **kw: Any) -> Any:
        a = self.args
        cfg = guest_config(self.image, memory, "dst", incoming="defer", fill_mib=a.fill,
                           tick_ms=a.tick, pace_ms=a.pace, work_pages=a.work,
                           dirty_mib=a.dirty, **kw)
        disk = self.dest_disk or self.disk
        if disk is not None:
            cfg.extra_args += disk_args(disk)
        if rigstate.RIG is None:
            return cfg
        return rigstate.HostConfig(**{f.name: getattr(cfg, f.name) for f in fields(cfg)},
                                   prefix=rigstate.RIG.prefix("dst"))

    async def stream_uri(self) -> str:
        """The URI the source migrates to; starts the byte-counting proxy
        in front of the destination's incoming socket."""
        target = str(self.workdir / "incoming.sock")
        if rigstate.RIG is not None:   # across the rig's migration link, with its delay
            from rig import LinkHop
            hop = LinkHop(rigstate.RIG, str(self.workdir / "link.sock"), target,
                          delay=self.args.rig_delay_ms / 1000)
            self.metrics["_hop"] = hop
            self.metrics["_link0"] = rigstate.RIG.tx_bytes("migration")
            self.metrics["_sto0"] = rigstate.storage_sent()
            target = hop.listen
        if self.args.no_proxy:
            return f"unix:{target}"
        proxy = StreamCounter(str(self.workdir / "proxy.sock"), target)
        await self.nursery.start(proxy.run)
        self.metrics["_proxy"] = proxy
        return f"unix:{proxy.listen}"

    async def tune(self, *qmps: Any) -> None:
        for q in qmps:
            await q.execute("migrate-set-parameters", {
                "max-bandwidth": self.args.bandwidth * MIB,
                "downtime-limit": self.args.downtime_limit})

    async def start_plain(self, dst: VM) -> MigrationWatch:
        """QEMU's own migration to ``dst``: tuned, through the stream URI;
        returns the watch on the source's migration status."""
        await self.tune(self.src.qmp, dst.qmp)
        await migrate_incoming(dst.qmp, f"unix:{self.workdir / 'incoming.sock'}")
        uri = await self.stream_uri()
        self.t_migrate = time.monotonic()
        watch = MigrationWatch(started=self.t_migrate)
        self.nursery.start_soon(watch_dest, self, dst)
        await self.src.qmp.execute("migrate", {"uri": uri})
        return watch


async def watch_dest(run: Run, dst: VM) -> None:
    """Record when the destination starts running the guest."""
    try:
        while (await dst.qmp.execute("query-status"))["status"] != "running":
            await trio.sleep(0.02)
    except Exception:
        return              # the destination went away: the run reports why
    run.metrics["dst_run_s"] = time.monotonic() - run.t_migrate


def record_source(run: Run, watch: MigrationWatch) -> None:
    """The source's own figures of a completed QEMU migration."""
    info = watch.info
    run.metrics.update(
        downtime_ms=info.get("downtime"), total_ms=info.get("total-time"),
        src_free_s=watch.at("completed"),
        ram_bytes=info.get("ram", {}).get("transferred"))
