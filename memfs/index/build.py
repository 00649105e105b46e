"""Building a disk index: read a disk (all of it, or only what changed since
a base index) and hash its 4 KiB blocks."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from array import array
from dataclasses import asdict, dataclass
from typing import Sequence

import trio
import xxhash

from ..disks import DiskError, open_disk
from ..pagemap import ZERO_CHECKSUM, u64_array
from ..progress import Progress
from .format import BLOCK, CHUNK, READ, DiskIndex, chunk_hash

log = logging.getLogger("memfs.index")

_ZERO_CHUNK = bytes(CHUNK)


@dataclass
class IndexResult:
    disk: str = ""
    index: str = ""
    size: int = 0
    entries: int = 0
    blocks_hashed: int = 0
    zero_blocks: int = 0
    bytes_read: int = 0
    chunks_total: int = 0
    chunks_reused: int = 0
    mode: str = "full"
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _spans(chunk_ids: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Reads (offset, length) covering the given sorted chunks, at most READ each."""
    out: list[tuple[int, int]] = []
    per = READ // CHUNK
    i = 0
    while i < len(chunk_ids):
        j = i
        while j + 1 < len(chunk_ids) and chunk_ids[j + 1] == chunk_ids[j] + 1 and j + 1 - i < per:
            j += 1
        start = chunk_ids[i] * CHUNK
        end = min((chunk_ids[j] + 1) * CHUNK, size)
        out.append((start, end - start))
        i = j + 1
    return out


def changed_ranges_qcow2(path: str) -> list[tuple[int, int]]:
    """Guest ranges (offset, length) allocated in the qcow2 image ``path``
    itself, not in its backing chain: what changed since the chain below it
    was frozen.  Asks ``qemu-img map`` (with -U: the image may be open)."""
    try:
        res = subprocess.run(["qemu-img", "map", "-U", "--output=json", path],
                             capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DiskError(f"qemu-img map {path}: {e}") from None
    if res.returncode:
        raise DiskError(f"qemu-img map {path}: {res.stderr.strip()}")
    try:
        doc = json.loads(res.stdout)
        return [(int(e["start"]), int(e["length"])) for e in doc if int(e["depth"]) == 0]
    except (ValueError, KeyError, TypeError) as e:
        raise DiskError(f"qemu-img map {path}: unexpected output: {e}") from None


async def build_index(disk_uri: str, *, base: DiskIndex | None = None,
                      changed: Sequence[tuple[int, int]] | None = None,
                      progress: bool | None = None) -> tuple[DiskIndex, IndexResult]:
    """Index ``disk_uri``.  With ``base`` (an index of an earlier state of the
    same disk), unchanged chunks keep their entries: ``changed`` lists the
    byte ranges that may differ (only they are read); without it every chunk
    is read and compared with its coarse hash."""
    t0 = time.monotonic()
    try:
        disk = await open_disk(disk_uri)
    except DiskError as e:
        raise DiskError(f"cannot open disk: {e}") from None
    async with disk:
        p = _Pass(IndexResult(disk=disk_uri, size=disk.size,
                              chunks_total=-(-disk.size // CHUNK)), base, changed)
        spans = _spans(p.to_read, disk.size)
        bar = Progress(sum(n for _, n in spans), progress)
        send, recv = trio.open_memory_channel[tuple[int, bytes]](2)

        async def reader() -> None:
            async with send:
                for off, n in spans:
                    await send.send((off, await disk.read(off, n)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with recv:
                async for off, data in recv:
                    p.take(off, memoryview(data))
                    bar.update(len(data), "index")
    index = DiskIndex.from_entries(disk_uri, disk.size, p.entries(), p.chunks,
                                   {"created": time.time(), "mode": p.res.mode})
    p.res.entries = len(index)
    p.res.seconds = round(time.monotonic() - t0, 3)
    return index, p.res


class _Pass:
    """One indexing pass: which chunks to read, their fingerprints and the
    blocks hashed so far, and what a base index lends."""

    def __init__(self, res: IndexResult, base: DiskIndex | None,
                 changed: Sequence[tuple[int, int]] | None) -> None:
        size, nchunks = res.size, res.chunks_total
        if base is not None and (base.size != size or len(base.chunks) != nchunks):
            log.warning("the base index is of a %d-byte disk, this one has %d bytes: "
                        "full pass", base.size, size)
            base = None
        self.res, self.base = res, base
        self.changed = changed if base is not None else None
        if base is not None and self.changed is not None:
            res.mode = "changed-ranges"
            dirty: set[int] = set()
            for off, length in self.changed:
                if length > 0:
                    dirty.update(range(max(off, 0) // CHUNK,
                                       min(-(-(off + length) // CHUNK), nchunks)))
            self.to_read = sorted(dirty)
        else:
            res.mode = "fingerprint" if base is not None else "full"
            self.to_read = list(range(nchunks))
        self.chunks = array("Q", base.chunks) if base is not None else \
            u64_array(bytes(8 * nchunks))
        #: chunks whose blocks are hashed again (a fingerprint pass finds them)
        self.rehash: set[int] = set(self.to_read) if base is None or changed is not None \
            else set()
        self.new: dict[int, int] = {}

    def take(self, off: int, view: memoryview) -> None:
        """Fingerprint the chunks of one read; hash the blocks of those that changed."""
        self.res.bytes_read += len(view)
        for c0 in range(0, len(view), CHUNK):
            c = (off + c0) // CHUNK
            piece = view[c0:c0 + CHUNK]
            fp = chunk_hash(piece)
            if self.base is not None and self.changed is None:
                if fp == self.base.chunks[c]:
                    continue
                self.rehash.add(c)
            self.chunks[c] = fp
            _hash_blocks(piece, (off + c0) // BLOCK, self.new, self.res)

    def entries(self) -> dict[int, int]:
        """The base's entries of chunks not hashed again, then the new ones."""
        entries: dict[int, int] = {}
        if self.base is not None:
            for h, b in self.base.entries():
                if b * BLOCK // CHUNK not in self.rehash:
                    entries[h] = b
            self.res.chunks_reused = self.res.chunks_total - len(self.rehash)
        for h, b in self.new.items():
            entries.setdefault(h, b)
        return entries


def _hash_blocks(piece: memoryview, first_block: int, out: dict[int, int],
                 res: IndexResult) -> None:
    n = len(piece) // BLOCK
    if piece == _ZERO_CHUNK[:len(piece)]:
        res.zero_blocks += n
        return
    digest = xxhash.xxh3_64_intdigest
    setdefault = out.setdefault
    zero = ZERO_CHECKSUM
    res.blocks_hashed += n
    for k in range(n):
        h = digest(piece[k * BLOCK:(k + 1) * BLOCK])
        if h == zero:
            res.zero_blocks += 1
        else:
            setdefault(h, first_block + k)
