"""A restored clone's NICs: a new MAC that the running guest really sees.

Why: the device state of a saved guest carries each NIC's MAC, and the guest
kernel read it from the device when its driver probed (virtio-net reads its
config space at probe; a later config change carries only the link status).
A new ``mac=`` on the clone's command line is overwritten by the loaded
state, and rewriting the MAC inside the saved stream would change QEMU's
side only: the guest would go on sending from the old address.  So each NIC
is replaced once the clone runs: ``device_del`` (the guest releases it
through PCI hotplug), then the same ``-device`` with the new MAC, which the
guest's driver probes afresh.  Until then the old NIC's link is down, so no
frame leaves a clone with its siblings' MAC.

This needs the NIC on a hotpluggable bus (on q35 a ``pcie-root-port``, on pc
the root bus) and a guest with PCI hotplug and the NIC's driver; both are
checked (the bus before the state is loaded, the guest by a timeout).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Sequence

import trio

from ..snapshot import SnapshotError
from .props import join_props, parse_props
from .qmp import QMP, QMPError

__all__ = ["Nic", "new_mac", "clone_nic", "check_replaceable", "set_links", "replace_nics"]

#: seconds a guest gets to release a NIC it was asked to unplug
RELEASE_TIMEOUT = 20.0


@dataclass
class Nic:
    """One NIC of a clone: its qdev id, its ``-device`` value (with the new
    MAC) and the MAC."""

    id: str
    device: str
    mac: str


def new_mac() -> str:
    """A random locally administered unicast MAC."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def clone_nic(value: str, k: int) -> Nic:
    """A NIC's ``-device`` value with a new MAC and an id (``memfs-nicK`` if
    it had none: the id is how it is unplugged; the saved state names
    devices by their bus address, not by id)."""
    props = parse_props(value)
    mac = new_mac()
    ids = [v for key, v in props if key == "id"]
    nic_id = ids[0] if ids else f"memfs-nic{k}"
    out = [(key, v) for key, v in props if key != "mac"]
    if not ids:
        out.append(("id", nic_id))
    return Nic(nic_id, join_props(out + [("mac", mac)]), mac)


async def check_replaceable(qmp: QMP, nics: Sequence[Nic]) -> None:
    """Each NIC must sit on a hotpluggable bus: refused before anything is
    loaded, in one line."""
    for nic in nics:
        try:
            ok = await qmp.execute("qom-get", {"path": f"/machine/peripheral/{nic.id}",
                                               "property": "hotpluggable"})
        except QMPError as e:
            raise SnapshotError(f"NIC {nic.id}: {e.desc}") from None
        if not ok:
            raise SnapshotError(
                f"NIC {nic.id} is on a bus without hotplug, so the guest cannot be given "
                "its new MAC (put it on a pcie-root-port on q35, or restore with --keep-mac)")


async def set_links(qmp: QMP, nics: Sequence[Nic], up: bool) -> None:
    for nic in nics:
        await qmp.execute("set_link", {"name": nic.id, "up": up})


async def replace_nics(qmp: QMP, nics: Sequence[Nic],
                       timeout: float = RELEASE_TIMEOUT) -> float:
    """Unplug each NIC and plug it again with its new MAC (the guest runs);
    returns the seconds it took."""
    t0 = time.monotonic()
    for nic in nics:
        await qmp.execute("device_del", {"id": nic.id})
        try:
            await qmp.wait_event("DEVICE_DELETED", timeout=timeout, match={"device": nic.id})
        except trio.TooSlowError:
            raise SnapshotError(
                f"QEMU {qmp.path}: the guest did not release NIC {nic.id} within "
                f"{timeout:g} s (it needs PCI hotplug and the NIC's driver; or restore "
                "with --keep-mac)") from None
        err = await qmp.execute("human-monitor-command",
                                {"command-line": f"device_add {nic.device}"})
        if err.strip():
            raise SnapshotError(f"QEMU {qmp.path}: device_add {nic.id}: {' '.join(err.split())}")
        await qmp.execute("set_link", {"name": nic.id, "up": True})
    return time.monotonic() - t0
