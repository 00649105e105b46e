"""The disk index file: which 4 KiB blocks of a disk hold which content.

Pure data (see memfs.index for the whole story): msgpack in a msgfile
envelope, per-block data as packed little-endian uint64 arrays (``hashes``
sorted and distinct, ``blocks`` the block number of each hash) looked up by
binary search, and ``chunks``, a coarse xxh3 per 1 MiB of the disk that lets
a re-index skip unchanged chunks.  A file that fails any check is refused
whole.
"""

from __future__ import annotations

import bisect
import operator
import os
from array import array
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable

import msgpack
import xxhash

from .. import msgfile
from ..pagemap import PAGE_SIZE, get_field, u64_array, u64_bytes

MAGIC = b"MEMFS-IX"
VERSION = 2
BLOCK = PAGE_SIZE
CHUNK = 1 << 20                 # the coarse fingerprint granule
READ = 8 << 20                  # largest single read while indexing
MAX_DISK = 1 << 60


class DiskIndexError(Exception):
    """Raised for every malformed, inconsistent or unreadable index file."""


FORMAT = msgfile.Format(MAGIC, VERSION, "disk index", DiskIndexError, v1_magic="memfs-index")


def chunk_hash(data: bytes | memoryview) -> int:
    """The coarse fingerprint of one chunk (a re-index compares them)."""
    return xxhash.xxh3_64_intdigest(data)


# -- the index -----------------------------------------------------------------

@dataclass
class DiskIndex:
    """Distinct block contents of one disk: sorted hashes and their blocks."""

    disk: str
    size: int
    hashes: array = field(default_factory=u64_array)
    blocks: array = field(default_factory=u64_array)
    chunks: array = field(default_factory=u64_array)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nblocks(self) -> int:
        return self.size // BLOCK

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, csum: int) -> int | None:
        """Byte offset of a block whose content hashes to ``csum``, or None."""
        h = self.hashes
        i = bisect.bisect_left(h, csum)
        if i < len(h) and h[i] == csum:
            return self.blocks[i] * BLOCK
        return None

    def entries(self) -> Iterable[tuple[int, int]]:
        """(hash, block number) pairs, by hash."""
        return zip(self.hashes, self.blocks)

    @classmethod
    def from_entries(cls, disk: str, size: int, entries: dict[int, int], chunks: array,
                     meta: dict[str, Any] | None = None) -> "DiskIndex":
        keys = sorted(entries)
        return cls(disk, size, array("Q", keys), array("Q", map(entries.__getitem__, keys)),
                   chunks, dict(meta or {}))

    # -- serialisation ----------------------------------------------------------

    def _doc(self) -> bytes:
        return msgpack.packb({
            "disk": self.disk, "size": self.size,
            "block_size": BLOCK, "chunk_size": CHUNK, "meta": self.meta,
            "hashes": u64_bytes(self.hashes), "blocks": u64_bytes(self.blocks),
            "chunks": u64_bytes(self.chunks)}, use_bin_type=True)

    def dumps(self) -> bytes:
        return msgfile.dumps(FORMAT, [self._doc()])

    @classmethod
    def loads(cls, data: bytes | bytearray | memoryview) -> "DiskIndex":
        return _from_doc(msgfile.loads(FORMAT, data))

    def save(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        """Write atomically, never through a symbolic link (raises OSError)."""
        msgfile.write(path, FORMAT, [self._doc()], mode=mode)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "DiskIndex":
        doc = msgfile.load(path, FORMAT)
        try:
            return _from_doc(doc)
        except DiskIndexError as e:
            raise DiskIndexError(f"{os.fspath(path)}: {e}") from None


def _get(doc: dict, key: str, typ: type) -> Any:
    return get_field(doc, key, typ, "disk index", DiskIndexError)


def _from_doc(doc: Any) -> DiskIndex:
    disk = _get(doc, "disk", str)
    size = _get(doc, "size", int)
    if not 0 <= size <= MAX_DISK:
        raise DiskIndexError(f"bad disk size {size}")
    if _get(doc, "block_size", int) != BLOCK or _get(doc, "chunk_size", int) != CHUNK:
        raise DiskIndexError(f"unsupported block or chunk size (this memfs uses "
                             f"{BLOCK} and {CHUNK})")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise DiskIndexError("'meta' should be a map")
    hashes, blocks, chunks = (_get(doc, k, bytes) for k in ("hashes", "blocks", "chunks"))
    if len(hashes) % 8 or len(hashes) != len(blocks):
        raise DiskIndexError(f"'hashes' ({len(hashes)} bytes) and 'blocks' "
                             f"({len(blocks)} bytes) are not two arrays of equal length")
    nchunks = -(-size // CHUNK)
    if len(chunks) != 8 * nchunks:
        raise DiskIndexError(f"'chunks' holds {len(chunks)} bytes, expected {8 * nchunks} "
                             f"for a disk of {size} bytes")
    nblocks = size // BLOCK
    if len(hashes) // 8 > nblocks:
        raise DiskIndexError(f"{len(hashes) // 8} entries for a disk of {nblocks} blocks")
    h, b = u64_array(hashes), u64_array(blocks)
    if b and max(b) >= nblocks:
        raise DiskIndexError(f"block number {max(b)} is beyond the disk ({nblocks} blocks)")
    if not all(map(operator.lt, h, islice(h, 1, None))):
        raise DiskIndexError("'hashes' are not sorted and distinct")
    return DiskIndex(disk, size, h, b, u64_array(chunks), meta)
