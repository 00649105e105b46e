"""bench-migrate's memfs rows: memfs, memfs+refs (the guest's disk frozen
and indexed) and memfs-source (the source guest on a memfs source mount)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from memfs import control, hostmem
from memfs.qemu import VM, file_backend
from memfs.qemu.migrate import MigrateOptions
from memfs.qemu.migrate import migrate as migrate_memfs

from benchlib import rigstate
from benchlib.migrate_run import Run, watch_dest
from benchlib.mounts import memfs_cli, stop_mount

MIB = 1 << 20


@asynccontextmanager
async def memfs_refs(run: Run) -> AsyncIterator[VM]:
    """memfs with disk references: the guest's disk frozen and indexed;
    ``memfs migrate --disk/--index`` references the guest's page cache of its
    disk instead of writing it.  On the rig the disk is an RBD image and the
    frozen disk an RBD snapshot of it (the guest keeps its image; both QEMUs
    open it); else a qcow2 external snapshot makes the image a read-only base
    (the overlay takes the guest's writes and is the destination's disk),
    served by qemu-nbd --read-only."""
    if run.disk is None:
        raise NotImplementedError("memfs+refs needs a guest disk (--disk MiB > 0)")
    if isinstance(run.disk, str):
        ceph = rigstate.CEPH
        await trio.to_thread.run_sync(ceph.snap, run.disk, "frozen")
        async with indexed_memfs(run, ceph.uri(run.disk, "frozen")) as dst:
            yield dst
        return
    overlay = run.workdir / "overlay.qcow2"
    await run.src.qmp.execute("blockdev-snapshot-sync", {
        "node-name": "disk0", "snapshot-file": str(overlay),
        "snapshot-node-name": "overlay0", "format": "qcow2"})
    os.chmod(run.disk, 0o444)
    run.dest_disk = overlay
    sock = run.workdir / "disk.sock"
    nbd = await trio.lowlevel.open_process(
        ["qemu-nbd", "--read-only", "--persistent", "--shared=8", "--format=qcow2",
         f"--socket={sock}", str(run.disk)], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(10):
            while not sock.exists():
                if nbd.returncode is not None:
                    raise RuntimeError("qemu-nbd did not start")
                await trio.sleep(0.02)
        async with indexed_memfs(run, f"nbd+unix:///?socket={sock}") as dst:
            yield dst
    finally:
        with trio.CancelScope(shield=True):
            nbd.kill()
            await nbd.wait()


@asynccontextmanager
async def indexed_memfs(run: Run, uri: str) -> AsyncIterator[VM]:
    """Index the frozen disk ``uri`` (on the source host) and migrate with
    references to it."""
    idx = run.workdir / "disk.idx"
    t0 = time.monotonic()
    await memfs_cli("index", uri, "--out", str(idx), "--no-progress")
    run.metrics["index_s"] = round(time.monotonic() - t0, 2)
    async with memfs(run, disk=uri, index=str(idx)) as dst:
        yield dst


def migrate_options(run: Run, mnt: Path, uri: str, disk: str | None,
                    index: str | None) -> MigrateOptions:
    """``memfs migrate``'s options for this run: the volume is the source
    mount's own (memfs-source), an RBD image (--rig) or a file here."""
    a = run.args
    ceph = rigstate.CEPH
    return MigrateOptions(
        source_qmp=None, rams=[("ram0", str(run.src_ram))],
        volume=None if run.src_mount else (
            ceph.uri(f"vol-{run.workdir.name}") if ceph is not None
            else str(run.workdir / "memfs.vol")),
        pagemap=str(run.workdir / "memfs.pagemap"), dest_qmp=None,
        dest_mount=str(mnt), passes=a.memfs_passes,
        incoming_uri=f"unix:{run.workdir / 'incoming.sock'}",
        outgoing_uri=uri, timeout=a.timeout, disk=disk, index=index)


def record_memfs(run: Run, rep: Any, disk: str | None) -> None:
    """The migrate command's report as the row's figures."""
    run.metrics.update(
        downtime_ms=rep.downtime_ms, total_ms=rep.total_ms,
        src_free_s=rep.started + rep.src_free_ms / 1000 - run.t_migrate,
        ram_bytes=rep.stream_bytes, volume_bytes=rep.volume_bytes,
        pages_referenced=rep.pages_referenced,
        ref_bytes=rep.pages_referenced * 4096 if disk else None,
        pages_remote_at_resume=rep.pages_remote_at_resume,
        final_pass_ms=rep.final_pass_ms, memfs_steps_ms=rep.steps_ms,
        volume_bytes_before=rep.volume_bytes_before or None,
        memfs_passes=rep.passes)


async def dest_host_mem(run: Run, mnt: Path, store: str) -> None:
    """(--memfs-prefetch) the destination's host memory once it is complete."""
    with trio.fail_after(run.args.timeout):
        while not control.read_stats(mnt).get("prefetch_done"):
            await trio.sleep(0.2)
    await trio.sleep(1.5)  # the daemon's trim runs every second
    hm = await trio.to_thread.run_sync(
        hostmem.measure, mnt, "ram0", [Path(store) / "ram0.pages", run.workdir / "memfs.vol"])
    run.metrics["dst_host_mem"] = hm.as_dict()


@asynccontextmanager
async def memfs(run: Run, disk: str | None = None,
                index: str | None = None) -> AsyncIterator[VM]:
    """memfs: capture passes to a volume while the source runs, the final pass
    with it stopped, the page map handed to the destination's mount, the
    device state alone in the stream (x-ignore-shared). The destination's RAM
    is a file of a memfs mount; it fetches pages from the volume on first
    touch. The source is free once its device state is sent."""
    a = run.args
    mnt = run.workdir / "memfs-mnt"
    mnt.mkdir(parents=True)
    store, logfile = str(run.workdir / "memfs-store"), str(run.workdir / "memfs.log")
    await memfs_cli("mount", "--region", f"ram0:{a.ram * MIB}", "--store", store,
                    "--log", logfile, *([] if a.memfs_prefetch else ["--no-prefetch"]),
                    str(mnt), on_dst=True)
    try:
        dst_mem = file_backend(mnt / "ram0", a.ram * MIB, share=True)
        async with VM.start(run.dest_config(dst_mem), run.workdir) as dst:
            opts = migrate_options(run, mnt, await run.stream_uri(), disk, index)
            run.t_migrate = time.monotonic()
            run.nursery.start_soon(watch_dest, run, dst)
            rep = await migrate_memfs(opts, run.src.qmp, dst.qmp)
            record_memfs(run, rep, disk)
            try:
                yield dst
                if a.memfs_prefetch:
                    await dest_host_mem(run, mnt, store)
            finally:
                st = control.read_stats(mnt)
                run.metrics["pages_fetched_after"] = st.get("pages_fetched")
    finally:
        await stop_mount(mnt)


@asynccontextmanager
async def memfs_source(run: Run) -> AsyncIterator[VM]:
    """memfs with the source on memfs: the source guest booted on a source
    mount (memfs mount --new --volume), which copied the pages it wrote to
    the volume in the background; memfs migrate's passes are write-back plus
    a copy of the dirty pages, the final one with the guest stopped."""
    assert run.src_mount is not None
    hm = await trio.to_thread.run_sync(
        hostmem.measure, run.src_mount, "ram0",
        [run.workdir / "src-store" / "ram0.pages", run.workdir / "memfs.vol"])
    run.metrics["src_host_mem"] = hm.as_dict()
    async with memfs(run) as dst:
        yield dst


async def source_mount(workdir: Path, ram_mib: int, extra: list[str]) -> Path:
    """Start the source mount memfs-source boots its guest on."""
    mnt = workdir / "src-mnt"
    mnt.mkdir(parents=True)
    ceph = rigstate.CEPH
    volume = (ceph.uri(f"srcvol-{workdir.name}") if ceph is not None
              else str(workdir / "memfs.vol"))
    await memfs_cli("mount", "--new", f"ram0:{ram_mib * MIB}", "--volume", volume,
                    "--store", str(workdir / "src-store"), "--log",
                    str(workdir / "src-memfs.log"), *extra, str(mnt))
    return mnt
