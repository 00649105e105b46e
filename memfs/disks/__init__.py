"""Disks: read (and, for capture, write) byte ranges of a disk named by URI.

This layer knows nothing of FUSE or page maps.  A disk is a file path,
``file:///path``, ``nbd://host[:port]/export`` or
``nbd+unix:///export?socket=PATH`` or ``rbd:pool/image[@snap][:conf=PATH]...``.
"""

from __future__ import annotations

from .base import Disk, DiskError, DiskURI, parse_uri

__all__ = ["Disk", "DiskError", "DiskURI", "parse_uri", "open_disk"]


async def open_disk(uri: str, *, writable: bool = False, create_size: int | None = None) -> Disk:
    """Open the disk named by ``uri``.

    ``create_size`` makes a file disk that does not exist yet (capture's
    migration volume) or an RBD image that does not exist yet (and grows
    a smaller one); it is ignored for NBD, whose exports have a size.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        from .file import FileDisk
        return await FileDisk.open(parsed, writable=writable, create_size=create_size)
    if parsed.scheme == "rbd":
        from .rbd import RBDDisk
        return await RBDDisk.open(parsed, writable=writable, create_size=create_size)
    from .nbd import NBDDisk
    return await NBDDisk.open(parsed, writable=writable)
