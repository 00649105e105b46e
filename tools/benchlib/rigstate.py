"""bench-migrate --rig: the three-host rig (tests/rig.py) and the Ceph cluster
on its storage host, set up once before trio starts and read by every row.

Why module state: the rig must exist before trio's threads start (this
process moves to the source host), and every row and helper needs it.
Read it as ``rigstate.RIG`` / ``rigstate.CEPH`` (never ``from``-import them).
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from memfs.qemu.vm import VMConfig

#: the three-host rig when --rig: the stream crosses its migration link
RIG: Any = None
#: (--rig) a Ceph cluster on the rig's storage host: the memfs rows' volumes
CEPH: Any = None


def setup_rig(a: argparse.Namespace, stack: ExitStack) -> None:
    """--rig: the rig and the Ceph cluster on its storage host come up before
    trio starts, and this process moves to the source host, so that every
    thread it starts (trio's, librbd's) and every process lives there; the
    destination's mount is started on the destination host (dst_prefix)."""
    global RIG, CEPH
    from ceph import ceph_cluster, missing
    from rig import Rig
    RIG = stack.enter_context(Rig(migration=a.rig, storage=a.rig_storage))
    why = missing()
    if why:
        raise SystemExit(f"bench-migrate --rig: {why}")
    # fixed ports: the storage relay must listen on every address the maps name
    CEPH = stack.enter_context(ceph_cluster(RIG.storage_ip, tuple(RIG.prefix("sto")),
                                            mon_port=3300, osd_ports=(6800, 6807)))
    if a.rig_storage_delay_ms > 0:
        RIG.delay_storage(CEPH.client_ports(), a.rig_storage_delay_ms / 1000)
    RIG.enter("src")


def dst_prefix() -> list[str]:
    """argv prefix of a process on the destination host (the rig's, else here)."""
    return RIG.prefix("dst") if RIG is not None else []


def storage_sent() -> tuple[int, int, int]:
    """(source -> storage, storage -> destination, every direction of both
    storage links) bytes so far on the rig (the veth ends' kernel counters)."""
    s, d = RIG.tx_bytes("storage-src"), RIG.tx_bytes("storage-dst")
    return s["src"], d["sto"], s["src"] + s["sto"] + d["dst"] + d["sto"]


@dataclass
class HostConfig(VMConfig):
    """A QEMU started on another host of the rig (nsenter execs it: its pid
    is QEMU's): its disk's traffic crosses that host's storage link."""

    prefix: list[str] = field(default_factory=list)

    def argv(self, qmp_path: str) -> list[str]:
        return [*self.prefix, *super().argv(qmp_path)]
