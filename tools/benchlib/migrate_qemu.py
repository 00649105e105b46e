"""bench-migrate's QEMU rows: pre-copy and post-copy, RAM on tmpfs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from memfs.qemu import VM, file_backend
from memfs.qemu.plain import MigrationWatch, set_capabilities

from benchlib.migrate_run import Run, record_source

MIB = 1 << 20


class NotConverged(Exception):
    """A migration still running at --timeout: the row's result, not a crash."""


@asynccontextmanager
async def precopy(run: Run) -> AsyncIterator[VM]:
    """QEMU pre-copy: all RAM goes through the stream before the switch-over."""
    dst_mem = file_backend(run.shm / "dst.ram", run.args.ram * MIB, share=True)
    async with VM.start(run.dest_config(dst_mem), run.workdir) as dst:
        watch = await run.start_plain(dst)
        await until_converged(run, watch)
        record_source(run, watch)
        yield dst


async def until_converged(run: Run, watch: MigrationWatch) -> None:
    """Wait for the migration to complete; a pre-copy that has not converged
    within --timeout is cancelled and its row says so, with what it had sent."""
    try:
        await watch.until(run.src.qmp, timeout=run.args.timeout)
    except trio.TooSlowError:
        info = await watch.poll(run.src.qmp)
        ram = info.get("ram", {})
        run.metrics.update(ram_bytes=ram.get("transferred"))
        await run.src.qmp.execute("migrate_cancel")
        raise NotConverged(
            f"did not converge in {run.args.timeout:g} s ({info.get('status')}: "
            f"{ram.get('transferred', 0) / MIB:.0f} MiB sent, {ram.get('remaining', 0) / MIB:.1f}"
            f" MiB remaining, {ram.get('dirty-sync-count')} dirty syncs, dirty rate "
            f"{ram.get('dirty-pages-rate', 0) * 4096 / MIB:.0f} MiB/s, expected downtime "
            f"{info.get('expected-downtime')} ms); cancelled") from None


@asynccontextmanager
async def postcopy(run: Run) -> AsyncIterator[VM]:
    """QEMU post-copy: RAM on tmpfs on both sides (QEMU refuses post-copy for
    other file-backed RAM); switch to post-copy --postcopy-after seconds after
    the migrate command; the source serves the rest on demand and in the
    background, and is needed until the last page has moved."""
    dst_mem = file_backend(run.shm / "dst.ram", run.args.ram * MIB, share=True)
    async with VM.start(run.dest_config(dst_mem), run.workdir) as dst:
        for q in (run.src.qmp, dst.qmp):
            await set_capabilities(q, postcopy_ram=True)
        watch = await run.start_plain(dst)
        await trio.sleep(run.args.postcopy_after)
        await watch.poll(run.src.qmp)
        if watch.status not in ("completed",):
            await run.src.qmp.execute("migrate-start-postcopy")
        await watch.until(run.src.qmp, timeout=run.args.timeout)
        record_source(run, watch)
        run.metrics["postcopy_s"] = watch.at("postcopy-active")
        yield dst
