"""bench-migrate: one row, from booting the source guest to the figures:
settle, migrate by one method, check the guest, count the links' bytes."""

from __future__ import annotations

import argparse
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from memfs.qemu import VM, file_backend, longest_gap
from memfs.qemu.guest import GuestImage, GuestSum, expected_work_md5, guest_config, read_sum
from memfs.report import unwrap

from benchlib import rigstate
from benchlib.guestdisk import disk_args, make_disk
from benchlib.migrate_memfs import source_mount
from benchlib.migrate_qemu import NotConverged
from benchlib.migrate_run import Run
from benchlib.mounts import stop_mount

MIB = 1 << 20
#: what the guest kernel says when its RAM arrived wrong (silent_dest)
OOPS = re.compile(rb"(?:kernel BUG at [ -~]+?!|[a-z_]+ corruption\.[ -~]+?\)"
                  rb"|BUG: soft lockup|Kernel panic - [ -~]+|BUG: unable to handle [ -~]+)")


async def run_method(name: str, method: Callable[[Run], Any], args: argparse.Namespace,
                     image: GuestImage, root: Path, shm_root: Path) -> dict[str, Any]:
    """One row: a failed method is a row with its error, not the end of the run."""
    if getattr(method, "pending", False):
        return {"method": name, "error": "not run: memfs migrate is not implemented yet"}
    slug = name.replace("+", "-")   # a '+' in the socket path would spoil the NBD URI
    workdir, shm = root / slug, shm_root / slug
    shm.mkdir(parents=True)
    src_ram = shm / "src.ram"
    result: dict[str, Any] = {"method": name}
    src_mount = None
    made: list[Run] = []    # the run, once the source is up: what a failed row measured
    try:
        if name == "memfs-source":
            workdir.mkdir(parents=True, exist_ok=True)
            src_mount = await source_mount(workdir, args.ram, args.source_mount_opt)
            src_ram = src_mount / "ram0"
        cfg = guest_config(image, file_backend(src_ram, args.ram * MIB, share=True), "src",
                           fill_mib=args.fill, tick_ms=args.tick, pace_ms=args.pace,
                           work_pages=args.work, dirty_mib=args.dirty)
        disk = disk_md5 = None
        if args.disk:
            disk, disk_md5 = make_disk(workdir, args.disk)
            cfg.extra_args += disk_args(disk)
        with trio.fail_after(args.timeout + 120):
            async with trio.open_nursery() as nursery, VM.start(cfg, workdir) as src:
                before = await settle(src, args, disk_md5, result)
                run = Run(args, image, workdir, shm, src, src_ram, nursery, disk=disk,
                          src_mount=src_mount)
                made.append(run)
                async with method(run) as dst:
                    await check_after(run, dst, before, result)
                count_links(run)
                result.update(run.metrics)
                nursery.cancel_scope.cancel()
    except Exception as e:
        failed(result, e, made[0] if made else None)
    finally:
        if src_mount is not None:
            await stop_mount(src_mount)
        shutil.rmtree(shm, ignore_errors=True)
    return result


async def settle(src: VM, args: argparse.Namespace, disk_md5: str | None,
                 result: dict[str, Any]) -> GuestSum:
    """Boot, read the disk (if any), run --settle seconds; the checksums
    before migrating, the workload's speed and the stall without migrating."""
    await src.console.expect(r"^READY", 120)
    if disk_md5 is not None:
        m = await src.console.command("readdisk", r"^(READDISK \S+ md5=(\w+)|ERR.*)", 120)
        if m.group(2) != disk_md5:
            raise RuntimeError(f"the guest read its disk wrong: {m.group(0)}")
    t_settle = time.monotonic()
    start = await read_sum(src.console, "settle")
    t_start = time.monotonic()
    await trio.sleep(args.settle)
    before = await read_sum(src.console, "before")
    # the guest's running speed on its source RAM (workload generations)
    result["work_per_s"] = round((before.gen - start.gen) / (time.monotonic() - t_start), 2)
    result["base_stall_ms"] = round(longest_gap(src.console.ticks, t_settle) * 1000)
    return before


async def check_after(run: Run, dst: VM, before: GuestSum, result: dict[str, Any]) -> None:
    """Run --after seconds on the destination; its stall and checksums."""
    await trio.sleep(run.args.after)
    t_end = time.monotonic()
    try:
        after = await read_sum(dst.console, "after", timeout=120)
    except (trio.TooSlowError, trio.BrokenResourceError, EOFError):
        raise RuntimeError(await silent_dest(run, dst)) from None
    ticks = run.src.console.ticks + dst.console.ticks
    result["stall_ms"] = round(longest_gap(ticks, run.t_migrate, t_end) * 1000)
    result["extra_stall_ms"] = result["stall_ms"] - result["base_stall_ms"]
    result["ok"] = (after.fill == before.fill and after.gen >= before.gen
                    and after.work == expected_work_md5(run.image, after.gen, run.args.work))
    if not result["ok"]:
        result["error"] = f"checksums differ: before {before}, after {after}"


def count_links(run: Run) -> None:
    """A completed row's bytes: the rig's links (--rig), the stream proxy's
    count, and what the source sent in all (stream plus volume)."""
    m = run.metrics
    hop, link0 = m.pop("_hop", None), m.pop("_link0", None)
    if hop is not None:
        link1 = rigstate.RIG.tx_bytes("migration")
        m["link_bytes"] = link1["src"] - link0["src"]
        m["link_return_bytes"] = link1["dst"] - link0["dst"]
        sto0, sto1 = m.pop("_sto0"), rigstate.storage_sent()
        m["to_storage_bytes"] = sto1[0] - sto0[0]
        m["from_storage_bytes"] = sto1[1] - sto0[1]
        m["storage_bytes"] = sto1[2] - sto0[2]
        # what the relay delivered to the destination's socket
        m["relay_bytes"] = hop.relay.bytes
        hop.close()
    proxy = m.pop("_proxy", None)
    if proxy is not None:
        m["stream_bytes"] = proxy.sent
    stream = m.get("stream_bytes", m.get("ram_bytes")) or 0
    m["src_bytes"] = stream + m.get("volume_bytes", 0)


def failed(result: dict[str, Any], e: BaseException, run: Run | None) -> None:
    """A failed row: what it measured before it failed, and why it failed."""
    e = unwrap(e)
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = unwrap(e.exceptions[0])
    if run is not None:
        result.update((k, v) for k, v in run.metrics.items() if not k.startswith("_"))
        hop = run.metrics.get("_hop")
        if hop is not None:
            link = rigstate.RIG.tx_bytes("migration")
            result["link_bytes"] = link["src"] - run.metrics["_link0"]["src"]
            result["relay_bytes"] = hop.relay.bytes
            hop.close()
        proxy = run.metrics.get("_proxy")
        if proxy is not None:
            result["stream_bytes"] = result["src_bytes"] = proxy.sent
    if isinstance(e, NotConverged):
        result["error"] = f"pre-copy {e}"
    elif isinstance(e, NotImplementedError):
        result["error"] = f"not run: {e}"
    else:
        result["error"] = f"{type(e).__name__}: {e}"


async def silent_dest(run: Run, dst: VM) -> str:
    """Why the destination did not answer ``sum after``: its QEMU status, its
    ticks after the migrate command, and (RAM files on both sides) how many
    pages of its RAM differ from the stopped source's."""
    status = "?"
    with trio.move_on_after(10):
        try:
            status = (await dst.qmp.execute("query-status", timeout=5))["status"]
        except Exception:   # QEMU exited (the guest panicked: -no-reboot)
            await trio.sleep(1)
            status = f"gone, exit code {dst.process.returncode}"
            if dst.stderr.strip():
                status += f", stderr {dst.stderr.strip()[-200:]!r}"
    ticks = [t - run.t_migrate for t, _ in dst.console.ticks if t >= run.t_migrate]
    why = (f"the destination guest did not answer 'sum after' (QEMU status "
           f"{status}; {len(ticks)} ticks after the migrate command"
           + (f", the last {ticks[-1]:.2f} s after it" if ticks else "") + ")")
    dst_ram = run.shm / "dst.ram"
    if dst_ram.exists() and run.src_mount is None:
        n, oops = await trio.to_thread.run_sync(differ, run.src_ram, dst_ram)
        why += f"; {n} pages differ from the source's RAM"
        if oops:
            why += "; the guest's kernel log there: " + " | ".join(oops)
    return why


def differ(a_path: Path, b_path: Path) -> tuple[int, list[str]]:
    """Pages that differ between two RAM files, and the guest kernel's oops
    lines in the second one's differing pages (the first three)."""
    n, oops = 0, []
    with open(a_path, "rb") as a, open(b_path, "rb") as b:
        while (x := a.read(MIB)) and (y := b.read(MIB)):
            for i in range(0, len(x), 4096):
                if x[i:i + 4096] != y[i:i + 4096]:
                    n += 1
                    oops += [m.decode() for m in OOPS.findall(y[i:i + 4096])]
    return n, list(dict.fromkeys(oops))[:3]
