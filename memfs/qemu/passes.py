"""The capture passes of a migration: by reading RAM, or by asking a memfs mount.

Why two: a source whose RAM is a plain shared file (/dev/shm, a memfd,
hugetlbfs) must be read whole in every pass, and the last pass, with the
guest stopped, reads and hashes every page: downtime grows with RAM.  A
source whose RAM is a memfs mount already knows which pages the guest wrote
(the kernel's write-back sends them as WRITEs, memfs.sync copies them to a
volume), so a pass is "write back and copy what is dirty" and the final one
is that plus a page map: it costs what the guest dirtied since the last pass.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import trio

from .. import control
from ..capture import BufferPool, capture
from ..capture_types import CaptureError, Referencer


class PassError(Exception):
    """A pass failed; the message says why."""


class ReadPasses:
    """Full-read capture passes (``memfs capture``), each based on the last.

    ``view``: the RAM is served by an older memfs mount without a volume of
    its own; its view lets capture skip pages it never handed out."""

    def __init__(self, rams: Sequence[tuple[str, str]], volume: str, tmp: str,
                 ref: Referencer | None, view_mount: str | None = None) -> None:
        self.rams, self.volume, self.tmp, self.ref = list(rams), volume, tmp, ref
        self.view_mount = view_mount
        self.base: str | None = None
        #: read buffers for every pass (a fresh one page-faults its whole size)
        self.pool = BufferPool()

    async def hand_over(self, dest_mount: str, out: str) -> None:
        await trio.to_thread.run_sync(control.load, dest_mount, out)

    async def finish(self, out: str) -> None:
        pass

    async def run(self, i: int, out: str | None) -> dict[str, Any]:
        """Pass ``i``; ``out`` is the page map to write for the final pass."""
        view = None
        if self.view_mount:
            view = os.path.join(self.tmp, "view.pagemap")
            await trio.to_thread.run_sync(control.save, self.view_mount, view)
        path = out or os.path.join(self.tmp, f"pass{i}.pagemap")
        try:
            res = await capture(self.rams, self.volume, path, base=self.base, view=view,
                                progress=False, referencer=self.ref, pool=self.pool)
        except CaptureError as e:
            raise PassError(str(e)) from None
        self.base = path
        return res.as_dict()


class MountPasses:
    """Passes on a source that is a memfs mount tracking its guest's writes."""

    def __init__(self, mount: str, volume: str | None, dest_mount: str | None = None,
                 tmp: str | None = None, passes: int = 0) -> None:
        self.mount = mount
        self.volume = volume
        #: the base page map goes to this destination mount in the last pass
        #: while the source runs (memfs.handover); the final pass sends a delta
        self.dest_mount = dest_mount
        self.tmp = tmp
        self.passes = passes
        self.staged: str | None = None
        self.sync_bytes = 0
        self.written_back = 0
        self.bytes_before = 0

    async def prepare(self) -> str:
        """Give the mount a volume if it has none; return the volume's URI."""
        st = await trio.to_thread.run_sync(control.read_stats, self.mount)
        have = st.get("sync_volume")
        if have and self.volume and os.path.abspath(have) != os.path.abspath(self.volume) \
                and have != self.volume:
            raise PassError(f"{self.mount} copies its pages to volume {have}, not "
                            f"{self.volume}: omit --volume or give that one")
        if not have:
            if not self.volume:
                raise PassError(f"{self.mount} has no volume: give --volume URI")
            await self._send(f"volume {self.volume}")
            st = await trio.to_thread.run_sync(control.read_stats, self.mount)
            have = st["sync_volume"]
        self.sync_bytes = int(st.get("sync_bytes", 0))
        self.written_back = int(st.get("pages_written_back", 0))
        #: what the guest's pages cost the volume before the migration started
        self.bytes_before = self.sync_bytes
        return str(have)

    async def _send(self, line: str) -> None:
        try:
            await trio.to_thread.run_sync(control.send, self.mount, line)
        except control.ControlError as e:
            raise PassError(f"{self.mount}: {line.split()[0]}: {e}") from None

    async def run(self, i: int, out: str | None) -> dict[str, Any]:
        """A pass: write back and copy what is dirty (``sync``); the final one
        (``out``) also writes the page map (``flush``).  The final pass runs
        with the guest stopped, so it asks for nothing else: ``account``
        fills in its figures once the destination runs."""
        t0 = time.monotonic()
        res: dict[str, Any] = {"source": "mount"}
        if out and self.staged:
            await self._send(f"delta {self.staged}.delta")
        elif out:
            await self._send(f"flush {out}")
        elif i == self.passes - 1 and self.dest_mount and self.tmp:
            # the last pass while the guest runs: the base goes over now
            base = os.path.join(self.tmp, "base.pagemap")
            await self._send(f"base {base}")
            try:
                await trio.to_thread.run_sync(control.send, self.dest_mount, f"stage {base}")
            except control.ControlError as e:
                raise PassError(f"{self.dest_mount}: stage: {e}") from None
            self.staged = base
            res["staged"] = True
        else:
            await self._send("sync")
        res["seconds"] = round(time.monotonic() - t0, 3)
        if not out:
            await self.account(res)
        return res

    async def hand_over(self, dest_mount: str, out: str) -> None:
        """Give the destination the final page map: the delta to its staged
        base, or the whole map."""
        if self.staged:
            await trio.to_thread.run_sync(control.send, dest_mount,
                                          f"commit {self.staged}.delta")
        else:
            await trio.to_thread.run_sync(control.load, dest_mount, out)

    async def finish(self, out: str) -> None:
        """After a hand-over by delta: the whole page map for the record (the
        source is stopped: nothing is dirty, nothing is copied)."""
        if self.staged:
            await self._send(f"flush {out}")

    async def account(self, res: dict[str, Any]) -> None:
        """What the pass ``res`` copied: the mount's counters since the last."""
        st = await trio.to_thread.run_sync(control.read_stats, self.mount)
        written = int(st["sync_bytes"]) - self.sync_bytes
        back = int(st.get("pages_written_back", 0))
        res.update({"pages_written": written // 4096, "bytes_written": written,
                    "pages_written_back": back - self.written_back,
                    "pages_unchanged": 0, "pages_kept": 0, "pages_referenced": 0,
                    "pages_zero": int(st.get("pages_zero", 0))})
        self.sync_bytes = int(st["sync_bytes"])
        self.written_back = back
