"""A saved VM on disk: the snapshot directory, its manifest, and its volume.

Why: a snapshot is read long after it was written, often by another host and
often as the base of many clones at once; one flipped bit in the device
state or the page map would reach a running guest unnoticed.  So the
directory carries a manifest that names every file of the snapshot with its
size and xxh3-128, and the manifest carries a checksum of its own; a restore
checks all of them before it starts anything (DESIGN.md invariant 8).  The
pages themselves live on a volume whose identity the manifest and the page
map both record; each page is verified on its first fetch by the mount.

    DIR/manifest.json   {"format": "memfs-snapshot", "version": 1, ...,
                         "checksum": xxh3-128 of the canonical JSON without it}
    DIR/devices         the device state: a QEMU migration stream made with
                        x-ignore-shared (no shared RAM in it)
    DIR/ram.pagemap     the page map: every page zero or on the volume
    (volume)            the pages, identity layout (memfs.capture, memfs.sync)

This module is pure data and files: no QEMU, no FUSE.  memfs.qemu.snapshot
writes snapshots, memfs.qemu.restore starts guests from them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import xxhash

from . import volume as volumes
from .disks import DiskError, open_disk, parse_uri
from .fileio import atomic_write
from .pagemap import PageMap, PageMapError, PageState

__all__ = ["SnapshotError", "Manifest", "file_sum", "MANIFEST", "DEVICES", "PAGEMAP",
           "rebase_volume", "check_new_volume"]

FORMAT = "memfs-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
DEVICES = "devices"
PAGEMAP = "ram.pagemap"


class SnapshotError(Exception):
    """A snapshot cannot be written or is refused; the message says which file and why."""


def file_sum(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Size and xxh3-128 (hex) of a file, read in 4 MiB pieces."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Manifest:
    """What a snapshot directory holds.  ``files``: name -> {"size", "xxh3"};
    ``regions``: name -> size; ``volume``: {"uri", "id", "at"}; ``qemu``: the
    source QEMU's argv and which argument is each region's backend."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    regions: dict[str, int] = field(default_factory=dict)
    volume: dict[str, Any] = field(default_factory=dict)
    qemu: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "files": self.files,
                "regions": self.regions, "volume": self.volume, "qemu": self.qemu,
                "created": self.created, "info": self.info}

    def add_file(self, directory: str, name: str) -> None:
        size, digest = file_sum(os.path.join(directory, name))
        self.files[name] = {"size": size, "xxh3": digest}

    def save(self, directory: str) -> None:
        doc = self.doc()
        doc["checksum"] = xxhash.xxh3_128_hexdigest(_canonical(doc))
        atomic_write(os.path.join(directory, MANIFEST),
                     [json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"])

    @classmethod
    def load(cls, directory: str) -> "Manifest":
        """The manifest of ``directory``, its own checksum checked."""
        path = os.path.join(directory, MANIFEST)
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 24)
        except OSError as e:
            raise SnapshotError(f"{path}: {e.strerror}") from None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise SnapshotError(f"{path}: corrupt: not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SnapshotError(f"{path}: not a memfs snapshot manifest")
        if doc.get("version") != VERSION:
            raise SnapshotError(f"{path}: snapshot version {doc.get('version')!r}, "
                                f"this memfs reads {VERSION}")
        want = doc.pop("checksum", None)
        if want != xxhash.xxh3_128_hexdigest(_canonical(doc)):
            raise SnapshotError(f"{path}: corrupt: checksum mismatch")
        try:
            m = cls(files=dict(doc["files"]), regions=dict(doc["regions"]),
                    volume=dict(doc["volume"]), qemu=dict(doc["qemu"]),
                    created=float(doc["created"]), info=dict(doc.get("info", {})))
            for name, f in m.files.items():
                if os.path.basename(name) != name or name in ("", ".", "..") \
                        or not isinstance(f.get("size"), int) or not isinstance(f.get("xxh3"), str):
                    raise ValueError(name)
            for name in (DEVICES, PAGEMAP):
                if name not in m.files:
                    raise ValueError(name)
            if not all(isinstance(v, int) and v > 0 for v in m.regions.values()):
                raise ValueError("regions")
            if not isinstance(m.qemu.get("argv"), list):
                raise ValueError("qemu")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SnapshotError(f"{path}: malformed manifest") from None
        return m

    def verify(self, directory: str) -> None:
        """Every file the manifest names: present, of its size, of its checksum."""
        for name, want in sorted(self.files.items()):
            path = os.path.join(directory, name)
            try:
                size, digest = file_sum(path)
            except OSError as e:
                raise SnapshotError(f"{path}: {e.strerror}") from None
            if size != want["size"]:
                raise SnapshotError(f"{path}: corrupt: {size} bytes, the manifest says "
                                    f"{want['size']}")
            if digest != want["xxh3"]:
                raise SnapshotError(f"{path}: corrupt: checksum mismatch")

    def check_pagemap(self, directory: str) -> PageMap:
        """The page map, loaded (its own checks), matching the manifest's
        regions and volume."""
        path = os.path.join(directory, PAGEMAP)
        try:
            pm = PageMap.load(path)
        except (PageMapError, OSError) as e:
            raise SnapshotError(f"{path}: {e}") from None
        have = {r.name: r.size for r in pm}
        if have != self.regions:
            raise SnapshotError(f"{path}: regions {have}, the manifest says {self.regions}")
        rec = volumes.recorded(pm.meta).get(self.volume.get("uri", ""))
        if rec != (self.volume.get("id"), self.volume.get("at")):
            raise SnapshotError(f"{path}: volume identity {rec}, the manifest says "
                                f"{self.volume}")
        return pm


async def rebase_volume(pm: PageMap, old_uri: str, new_uri: str) -> dict[str, Any]:
    """Copy the pages ``pm`` keeps on ``old_uri`` to the same offsets of a new
    volume ``new_uri`` (created), give it its own identity, and point ``pm``
    at it.  Why: a memfs source mount rewrites its volume in place while its
    guest runs, so a snapshot that must outlive the guest's next write needs
    pages of its own (invariant 6).  Returns {"uri", "id", "at", "bytes"}."""
    if old_uri not in pm.disks:
        raise SnapshotError(f"the page map does not refer to volume {old_uri}")
    if new_uri in pm.disks:
        raise SnapshotError(f"volume {new_uri} is already a disk of the page map")
    rec = volumes.recorded(pm.meta)
    if old_uri not in rec:
        raise SnapshotError(f"the page map records no identity for volume {old_uri}")
    at = rec[old_uri][1]
    di = pm.disks.index(old_uri)
    try:
        return await _rebase(pm, old_uri, new_uri, at, di)
    except (volumes.VolumeError, DiskError) as e:
        raise SnapshotError(f"copying the pages to {new_uri}: {e}") from None


async def check_new_volume(uri: str, at: int) -> None:
    """A snapshot's volume must be new: a file that does not exist yet, or a
    disk with no memfs volume identity on it.  Why: writing pages over
    another snapshot's volume would destroy that snapshot."""
    try:
        parsed = parse_uri(uri)
    except DiskError as e:
        raise SnapshotError(str(e)) from None
    if parsed.scheme == "file":
        if os.path.lexists(parsed.path):
            raise SnapshotError(f"volume {uri} exists: a snapshot needs a new volume")
        return
    try:
        async with await open_disk(uri) as disk:
            if disk.size >= at + volumes.IDENTITY_SIZE \
                    and await volumes.read_identity(disk, at) is not None:
                raise SnapshotError(f"volume {uri} already holds a memfs volume: give a new one")
    except (volumes.VolumeError, DiskError) as e:
        raise SnapshotError(f"volume {uri}: {e}") from None


async def _rebase(pm: PageMap, old_uri: str, new_uri: str, at: int, di: int) -> dict[str, Any]:
    copied = 0
    async with await open_disk(old_uri) as src, \
            await open_disk(new_uri, writable=True, create_size=at + volumes.IDENTITY_SIZE) as dst:
        if dst.size < at + volumes.IDENTITY_SIZE:
            raise SnapshotError(f"volume {new_uri} holds {dst.size} bytes; the snapshot "
                                f"needs {at + volumes.IDENTITY_SIZE}")
        if await volumes.read_identity(dst, at) is not None:
            raise SnapshotError(f"volume {new_uri} already holds a memfs volume: give a new one")
        for region in pm:
            ps = region.page_size
            n = region.npages
            p = 0
            while p < n:
                if region.states[p] != PageState.REMOTE or region.disks[p] != di:
                    p += 1
                    continue
                # a run of pages at consecutive offsets, up to 1 MiB
                q = p + 1
                while q < n and q - p < 256 and region.states[q] == PageState.REMOTE \
                        and region.disks[q] == di \
                        and region.offsets[q] == region.offsets[p] + (q - p) * ps:
                    q += 1
                off = region.offsets[p]
                data = await src.read(off, (q - p) * ps)
                await dst.write(off, data)
                copied += len(data)
                p = q
        await dst.flush()
        ident = await volumes.ensure_identity(dst, at)
        await dst.flush()
        uri = dst.uri
    pm.disks[di] = uri
    vols = pm.meta.setdefault(volumes.META_KEY, {})
    vols.pop(old_uri, None)
    volumes.record(pm.meta, uri, ident, at)
    return {"uri": uri, "id": ident, "at": at, "bytes": copied}

