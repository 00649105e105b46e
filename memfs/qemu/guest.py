"""The memfs test guest (tools/mkguest): where it is, how to boot it, how to
read its checksums, and what they must be.

Why: tests and benchmarks prove a migration kept guest RAM intact by comparing
the checksums the guest prints before and after; this module also models the
guest's data so a host can check the printed sums against the expected bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .vm import Console, VMConfig

__all__ = ["GuestImage", "GuestSum", "build_guest", "guest_config", "read_sum",
           "expected_fill_md5", "expected_work_md5"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "build" / "guest"
PAGE = 4096
MIB = 1 << 20
#: MiBs of distinct fill content (guest-init.sh: PERIOD)
FILL_PERIOD = 16


@dataclass(frozen=True)
class GuestImage:
    """The built guest: kernel, initramfs and the random block it embeds."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rand(self) -> Path:
        return self.dir / "rand.bin"


def build_guest(out: str | os.PathLike[str] | None = None) -> GuestImage:
    """Run tools/mkguest (a no-op when the guest is already built)."""
    out = Path(out) if out else DEFAULT_DIR
    subprocess.run([str(REPO / "tools" / "mkguest"), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return GuestImage(out)


def guest_append(fill_mib: int = 64, work_pages: int = 64, tick_ms: int = 50,
                 sum_every: int = 0, pace_ms: int = 20, dirty_mib: int = 0) -> str:
    """Kernel command line for the guest; ``dirty_mib`` > 0 adds the opt-in
    dirtier (memfs.dirty: rewrites that many MiB outside the checksums in a
    tight loop), 0 leaves the command line as it always was."""
    line = (f"console=ttyS0 quiet panic=-1 memfs.fill={fill_mib} memfs.work={work_pages} "
            f"memfs.tick={tick_ms} memfs.sumevery={sum_every} memfs.pace={pace_ms}")
    return line + (f" memfs.dirty={dirty_mib}" if dirty_mib > 0 else "")


def guest_config(image: GuestImage, memory: dict[str, Any], name: str,
                 incoming: str | None = None, paused: bool = False, **append: Any) -> VMConfig:
    """A VMConfig booting the test guest with RAM ``memory``; the keyword
    arguments go to guest_append (fill_mib, work_pages, tick_ms, ...)."""
    return VMConfig(memory=memory, kernel=str(image.kernel), initrd=str(image.initrd),
                    append=guest_append(**append), incoming=incoming, paused=paused,
                    name=name)


@dataclass(frozen=True)
class GuestSum:
    """One ``SUM`` line: md5 of the fixed data and of the workload's area, the
    workload's generation, the guest's own longest tick gap (ms)."""

    id: str
    fill: str
    work: str
    gen: int
    maxgap_ms: int


_SUM = r"^SUM {id} fill=([0-9a-f]{{32}}) work=([0-9a-f]{{32}}) gen=(\d+) maxgap=(\d+)"


async def read_sum(console: Console, id: str, timeout: float = 60.0) -> GuestSum:
    """Ask the guest for its checksums (``sum ID``) and parse the reply."""
    m = await console.command(f"sum {id}", _SUM.format(id=re.escape(id)), timeout)
    return GuestSum(id, m.group(1), m.group(2), int(m.group(3)), int(m.group(4)))


def _rand2(image: GuestImage) -> bytes:
    r = image.rand.read_bytes()
    return r + r


def expected_fill_md5(image: GuestImage, fill_mib: int) -> str:
    """md5 of the guest's /data/fill, computed from the layout guest-init.sh makes."""
    r2 = _rand2(image)
    rsize = len(r2) // 2
    rep = r2[2:2 + PAGE] * (MIB // PAGE)
    zero = bytes(MIB)
    period: list[bytes] = []  # from MiB FILL_PERIOD on, MiB i repeats MiB i % FILL_PERIOD
    r = 0
    for i in range(min(fill_mib, FILL_PERIOD)):
        if i % 4 == 2:
            period.append(zero)
        elif i % 8 == 5:
            period.append(rep)
        else:
            off = (r * 8) % rsize
            period.append(r2[off:off + MIB])
            r += 1
    h = hashlib.md5()
    for i in range(fill_mib):
        h.update(period[i % FILL_PERIOD])
    return h.hexdigest()


def expected_work_md5(image: GuestImage, gen: int, work_pages: int = 64) -> str:
    """md5 of the guest's /data/work after ``gen`` workload generations."""
    r2 = _rand2(image)
    area = bytearray(work_pages * PAGE)
    # only the last write to each slot matters
    for h in range(max(0, gen - work_pages), gen):
        s = h % work_pages
        off = (h * 7 % 257) * PAGE + 4
        area[s * PAGE:(s + 1) * PAGE] = r2[off:off + PAGE]
    return hashlib.md5(area).hexdigest()
