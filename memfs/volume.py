"""Volume identity: which migration volume a page map was captured to.

Why: a page map names its volume by URI, but a path or an NBD export can be
recreated with the same name.  Every page of a recreated volume then fails
its checksum (EIO, SIGBUS in the guest) — or, worse, an incremental capture
``--base`` keeps the base's locations on a volume that no longer holds them.
So the volume carries its own identity, and the page map records it.

On the volume: one 4 KiB block right after the RAM layout (capture's
identity layout: region i at the sum of the sizes before it, each rounded up
to 1 MiB; the block sits at the end of the last region, see
:func:`identity_offset`), so a volume is ``volume_size(sizes)`` bytes:

    offset  size  field
    0       8     b"MEMFSVOL"
    8       4     version (1), little-endian
    12      4     zero
    16      16    a random UUID, made when the block is first written
    32      8     xxh3-64 of bytes 0..32, little-endian
    40      -     zeros up to 4096

In the page map: ``meta["volumes"] = {URI: {"id": UUID-string, "at": offset}}``
(:data:`META_KEY`), one entry per volume whose pages it refers to.

The API, for capture and for anything else that writes pages to a volume
and hands out page maps (a mount that syncs pages to a volume):

* ``uuid = await ensure_identity(disk, at)`` — the volume's identity,
  written first if the block is all zeros (a new volume).  Raises
  :class:`VolumeError` if the block holds anything else (another file's data,
  or a volume laid out for other RAM sizes): nothing is written then.
* ``await check_identity(disk, uuid, at)`` — :class:`VolumeError` unless
  the block at ``at`` holds exactly that identity.
* ``record(meta, disk.uri, uuid, at)`` — note it in a page map's meta.
* ``await check_pagemap(pm, disks)`` — check every volume a page map
  records against the open disks (``disks[i]`` serves ``pm.disks[i]``);
  the mount calls it before it serves a page.

All of them take an open :class:`memfs.disks.Disk` (file or NBD) and only
read or write that one block.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any, Sequence

import xxhash

from .disks import Disk, DiskError
from .pagemap import PageMap, PageMapError, PageState

MAGIC = b"MEMFSVOL"
VERSION = 1
IDENTITY_SIZE = 4096
ALIGN = 1 << 20
META_KEY = "volumes"

_HEAD = struct.Struct("<8sII16s")


class VolumeError(PageMapError):
    """The volume is not the one the page map was captured to, or is not a
    memfs volume at all.  A PageMapError: whoever refuses a bad page map
    refuses this one too."""


def ram_end(sizes: Sequence[int]) -> int:
    """End of the RAM layout: regions one after the other, each 1 MiB aligned."""
    return sum((s + ALIGN - 1) // ALIGN * ALIGN for s in sizes)


def identity_offset(sizes: Sequence[int]) -> int:
    """Where the identity block of a volume for regions of ``sizes`` lies."""
    return ram_end(sizes)


def volume_size(sizes: Sequence[int]) -> int:
    """The smallest volume that holds the RAM layout and its identity."""
    return ram_end(sizes) + IDENTITY_SIZE


def layout(sizes: Sequence[int]) -> list[int]:
    """Identity layout: the volume offset of each region (1 MiB aligned), then
    the volume's size: the regions and the identity block after them.  Used
    by capture and by a mount that copies its pages (memfs.sync) alike."""
    return [ram_end(sizes[:i]) for i in range(len(sizes))] + [volume_size(sizes)]


def encode(ident: str) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, 0, uuid.UUID(ident).bytes)
    block = head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little")
    return block + bytes(IDENTITY_SIZE - len(block))


def decode(block: bytes) -> str | None:
    """The identity in ``block``; None for a zero block; VolumeError otherwise."""
    if block.count(0) == len(block):
        return None
    magic, version, reserved, raw = _HEAD.unpack_from(block)
    n = _HEAD.size
    if magic != MAGIC or version != VERSION or reserved \
            or block[n:n + 8] != xxhash.xxh3_64_intdigest(block[:n]).to_bytes(8, "little") \
            or block[n + 8:].count(0) != len(block) - n - 8:
        raise VolumeError("no memfs volume identity")
    return str(uuid.UUID(bytes=raw))


async def read_identity(disk: Disk, at: int) -> str | None:
    """The identity of ``disk`` at ``at``, or None if that block is zeros or
    lies beyond the end.  VolumeError if it holds something else."""
    if disk.size < at + IDENTITY_SIZE:
        if disk.size <= at:
            return None
        raise VolumeError(f"volume {disk.uri} ends inside its identity block at {at}")
    try:
        block = await disk.read(at, IDENTITY_SIZE)
    except DiskError as e:
        raise VolumeError(f"cannot read the identity of volume {disk.uri}: {e}") from None
    try:
        return decode(block)
    except VolumeError:
        raise VolumeError(f"volume {disk.uri} holds data that is not a memfs volume "
                          f"identity at offset {at}: not a memfs volume, or one laid out for "
                          "other RAM sizes; refusing to write into it") from None


async def ensure_identity(disk: Disk, at: int) -> str:
    """The identity of a writable volume, created (and flushed) if it has none."""
    ident = await read_identity(disk, at)
    if ident is None:
        ident = str(uuid.uuid4())
        await disk.write(at, encode(ident))
        await disk.flush()
    return ident


async def check_identity(disk: Disk, expected: str, at: int) -> None:
    """VolumeError unless ``disk`` carries identity ``expected`` at ``at``."""
    try:
        have = await read_identity(disk, at)
    except VolumeError:
        have = "not a memfs volume"
    if have != expected:
        raise VolumeError(f"volume {disk.uri} is not the volume the page map was captured to "
                          f"(its identity is {have or 'missing'}, the page map expects "
                          f"{expected}): the volume was recreated or replaced")


def record(meta: dict[str, Any], uri: str, ident: str, at: int) -> None:
    meta.setdefault(META_KEY, {})[uri] = {"id": ident, "at": at}


def recorded(meta: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """URI -> (identity, offset) from a page map's meta; PageMapError if malformed."""
    vols = meta.get(META_KEY, {})
    if not isinstance(vols, dict):
        raise PageMapError(f"page map: meta {META_KEY!r} should be a map")
    out = {}
    for uri, v in vols.items():
        if not (isinstance(uri, str) and isinstance(v, dict) and isinstance(v.get("id"), str)
                and type(v.get("at")) is int and v["at"] >= 0):
            raise PageMapError(f"page map: bad volume identity entry for {uri!r}")
        try:
            uuid.UUID(v["id"])
        except ValueError:
            raise PageMapError(f"page map: bad volume identity {v['id']!r}") from None
        out[uri] = (v["id"], v["at"])
    return out


async def check_pagemap(pm: PageMap, disks: Sequence[Disk]) -> None:
    """Check each volume ``pm`` records; ``disks[i]`` is open on ``pm.disks[i]``."""
    for uri, (ident, at) in recorded(pm.meta).items():
        if uri in pm.disks:
            await check_identity(disks[pm.disks.index(uri)], ident, at)


# -- accounting ----------------------------------------------------------------------

def remote_split(pm: PageMap) -> dict[str, int]:
    """Remote pages on the migration volume (pm.meta['volume']; else the first
    disk, where capture puts it) vs on other disks."""
    volume = pm.meta.get("volume") if isinstance(pm.meta, dict) else None
    vol = pm.disks.index(volume) if volume in pm.disks else (0 if pm.disks else -1)
    remote = on_volume = 0
    is_remote = bytes(int(i == PageState.REMOTE) for i in range(256))
    is_vol = bytes(int(i == vol) for i in range(256))
    for r in pm.regions:
        a = r.states.translate(is_remote)
        remote += a.count(1)
        if vol >= 0:
            both = int.from_bytes(a, "little") & int.from_bytes(r.disks.translate(is_vol),
                                                                "little")
            on_volume += both.bit_count()
    return {"pages_on_volume": on_volume, "pages_on_disks": remote - on_volume}
