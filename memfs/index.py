"""Disk index: which 4 KiB blocks of a disk hold which content (issue 6).

A guest's page cache is full of copies of blocks of its own virtual disk.
``memfs index DISK --out INDEX`` hashes every 4 KiB-aligned block of a disk
(a file, or an NBD export such as a qcow2 image served by ``qemu-nbd``) with
xxh3-64, the page checksum of the page map, and keeps a compact index from
hash to block.  ``memfs capture --disk DISK --index INDEX`` then asks a
:class:`DiskReferencer` for every page it would otherwise write to the
migration volume: a page whose checksum is in the index *and whose bytes
equal the block on the disk* gets that block's location instead of a copy.

The index file is msgpack in a msgfile envelope (magic, version, xxh3-128 of
the whole content: a corrupt index is refused); its per-block data are
packed little-endian uint64 arrays (``hashes`` sorted and distinct, ``blocks``
the block number of each hash), looked up by binary search.  Zero blocks are
not indexed (capture never asks for zero pages).  One block is kept per
distinct content.  ``chunks`` holds a coarse xxh3 per 1 MiB of the disk:
the fingerprint that lets a re-index skip the per-block work for unchanged
chunks.

Re-indexing (``--base OLD``) reuses the old entries of every chunk that did
not change.  How it learns what changed:

* ``--changed-since OVERLAY.qcow2``: the disk is the frozen view
  ``OVERLAY`` over a backing chain that ``OLD`` indexed.  Only the ranges
  ``qemu-img map`` reports as allocated in ``OVERLAY`` itself are read and
  hashed; the rest of the disk is not read at all.
* otherwise the whole disk is read again and only chunks whose coarse hash
  changed are hashed block by block.  That saves the per-block hashing and
  the rebuild of their entries, not the reading: a disk that cannot say what
  changed must be read to know.

A page map may only refer to data that will not change (DESIGN.md invariant
6), so :func:`open_referencer` refuses a disk that is not read-only — a file
with a write bit in its mode, a block device without the read-only flag, an
NBD export without ``NBD_FLAG_READ_ONLY``, an RBD image that is not a
snapshot (``rbd:pool/image@snap``) — unless the caller says it is frozen.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import operator
import os
import stat
import subprocess
import sys
import time
from array import array
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Iterable, Sequence

import msgpack
import trio
import xxhash

from .capture import CaptureError, Progress
from .disks import Disk, DiskError, open_disk, parse_uri
from . import msgfile
from .pagemap import (PAGE_SIZE, ZERO_CHECKSUM, PageMap, PageState, checksum, get_field,
                      u64_array, u64_bytes)

log = logging.getLogger("memfs.index")

MAGIC = b"MEMFS-IX"
VERSION = 2
BLOCK = PAGE_SIZE
CHUNK = 1 << 20                 # the coarse fingerprint granule
READ = 8 << 20                  # largest single read while indexing
MAX_DISK = 1 << 60

_ZERO_CHUNK = bytes(CHUNK)


class DiskIndexError(Exception):
    """Raised for every malformed, inconsistent or unreadable index file."""


FORMAT = msgfile.Format(MAGIC, VERSION, "disk index", DiskIndexError, v1_magic="memfs-index")


# -- packed arrays -------------------------------------------------------------

def _chunk_hash(data: bytes | memoryview) -> int:
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


# -- building ------------------------------------------------------------------

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
        size = disk.size
        nchunks = -(-size // CHUNK)
        res = IndexResult(disk=disk_uri, size=size, chunks_total=nchunks)
        if base is not None and (base.size != size or len(base.chunks) != nchunks):
            log.warning("the base index is of a %d-byte disk, this one has %d bytes: "
                        "full pass", base.size, size)
            base = None
        if base is None:
            changed = None
        if base is not None and changed is not None:
            res.mode = "changed-ranges"
            dirty: set[int] = set()
            for off, length in changed:
                if length > 0:
                    dirty.update(range(max(off, 0) // CHUNK,
                                       min(-(-(off + length) // CHUNK), nchunks)))
            to_read = sorted(dirty)
        else:
            res.mode = "fingerprint" if base is not None else "full"
            to_read = list(range(nchunks))
        chunks = array("Q", base.chunks) if base is not None else u64_array(bytes(8 * nchunks))
        rehash: set[int] = set(to_read) if base is None or changed is not None else set()
        entries: dict[int, int] = {}
        new: dict[int, int] = {}
        bar = Progress(sum(n for _, n in _spans(to_read, size)), progress)
        send, recv = trio.open_memory_channel[tuple[int, bytes]](2)

        async def reader() -> None:
            async with send:
                for off, n in _spans(to_read, size):
                    await send.send((off, await disk.read(off, n)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with recv:
                async for off, data in recv:
                    res.bytes_read += len(data)
                    view = memoryview(data)
                    for c0 in range(0, len(data), CHUNK):
                        c = (off + c0) // CHUNK
                        piece = view[c0:c0 + CHUNK]
                        fp = _chunk_hash(piece)
                        if base is not None and changed is None:
                            if fp == base.chunks[c]:
                                continue
                            rehash.add(c)
                        chunks[c] = fp
                        _hash_blocks(piece, (off + c0) // BLOCK, new, res)
                    bar.update(len(data), "index")
        if base is not None:
            for h, b in base.entries():
                if b * BLOCK // CHUNK not in rehash:
                    entries[h] = b
            res.chunks_reused = nchunks - len(rehash)
        for h, b in new.items():
            entries.setdefault(h, b)
    index = DiskIndex.from_entries(disk_uri, size, entries, chunks,
                                   {"created": time.time(), "mode": res.mode})
    res.entries = len(index)
    res.seconds = round(time.monotonic() - t0, 3)
    return index, res


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


# -- referencing ----------------------------------------------------------------

_BLKROGET = 0x125E


def _file_read_only(path: str) -> tuple[bool, str]:
    """Is the file (or block device) at ``path`` read-only, and why (not)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CaptureError(f"disk {path}: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        import fcntl
        import struct
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ro = struct.unpack("i", fcntl.ioctl(fd, _BLKROGET, b"\0" * 4))[0]
            finally:
                os.close(fd)
        except OSError as e:
            raise CaptureError(f"disk {path}: {e.strerror}") from None
        return bool(ro), "the block device is not read-only (blockdev --setro)"
    if not stat.S_ISREG(st.st_mode):
        raise CaptureError(f"disk {path} is neither a regular file nor a block device")
    if st.st_mode & 0o222:
        return False, f"the file is writable (mode {stat.S_IMODE(st.st_mode):04o}; chmod a-w)"
    return True, ""


def _refuse(uri: str, why: str) -> CaptureError:
    return CaptureError(
        f"disk {uri} is not read-only: {why}. A page map may only refer to data that "
        "will not change: freeze the disk (a qcow2 external snapshot, see "
        "docs/disk-references.rst) and make it read-only, or pass --disk-frozen if you "
        "guarantee that it will not change while the page map refers to it")


class DiskReferencer:
    """The capture Referencer over one indexed disk: candidates by hash, then a
    byte comparison with the block read from the disk.  Disk reads are whole
    windows (1 MiB by default) kept in a small LRU, so that the many pages of a
    file the guest read in one go cost one read per window, not one per page."""

    def __init__(self, disk_uri: str, index: DiskIndex, frozen: bool = False,
                 window: int = 1 << 20, cache_windows: int = 64) -> None:
        if window < BLOCK or window % BLOCK:
            raise ValueError("window must be a multiple of the block size")
        self.disk_uri = disk_uri
        self.index = index
        self.frozen = frozen
        self.window = window
        self.cache_windows = max(cache_windows, 1)
        self._disk: Disk | None = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, trio.Event] = {}
        self.stats = {"lookups": 0, "candidates": 0, "hits": 0, "mismatches": 0,
                      "windows_read": 0, "bytes_read": 0}

    async def open(self) -> None:
        """Open the disk read-only and check that it may be referenced and
        still matches the index.  find() calls it when needed."""
        if self._disk is not None:
            return
        try:
            disk = await open_disk(self.disk_uri)
        except DiskError as e:
            raise CaptureError(f"cannot open disk: {e}") from None
        try:
            info = getattr(disk, "info", None)
            if info is not None and not self.frozen and not info.read_only:
                raise _refuse(self.disk_uri, "the NBD export is not advertised read-only "
                                             "(qemu-nbd --read-only)")
            if disk.size != self.index.size:
                raise CaptureError(f"disk {self.disk_uri} has {disk.size} bytes; its index "
                                   f"was made for {self.index.size}: re-run memfs index")
            self._disk = disk
            await self._check_sample()
        except BaseException:
            self._disk = None
            with trio.CancelScope(shield=True):
                await disk.aclose()
            raise

    async def _check_sample(self, n: int = 16) -> None:
        """A few indexed blocks must still hold their content: a stale index
        would otherwise only show as misses."""
        total = len(self.index)
        for i in sorted({total * k // n for k in range(n)} if total else ()):
            off = self.index.blocks[i] * BLOCK
            if checksum(await self._block(off)) != self.index.hashes[i]:
                raise CaptureError(f"the index of {self.disk_uri} is stale: the block at "
                                   f"{off} changed since it was indexed; re-run memfs index")

    async def find(self, csum: int, page: bytes) -> int | None:
        self.stats["lookups"] += 1
        off = self.index.lookup(csum)
        if off is None or len(page) != BLOCK:
            return None
        self.stats["candidates"] += 1
        if self._disk is None:
            await self.open()
        try:
            data = await self._block(off)
        except DiskError as e:
            raise CaptureError(f"reading a candidate block: {e}") from None
        if data != page:
            self.stats["mismatches"] += 1
            return None
        self.stats["hits"] += 1
        return off

    async def _block(self, off: int) -> memoryview:
        w = off // self.window
        data = await self._window(w)
        lo = off - w * self.window
        return memoryview(data)[lo:lo + BLOCK]

    async def _window(self, w: int) -> bytes:
        while True:
            data = self._cache.get(w)
            if data is not None:
                self._cache.move_to_end(w)
                return data
            ev = self._loading.get(w)
            if ev is None:
                break
            await ev.wait()
        ev = self._loading[w] = trio.Event()
        try:
            assert self._disk is not None
            start = w * self.window
            n = min(self.window, self.index.size - start)
            data = await self._disk.read(start, n)
            self.stats["windows_read"] += 1
            self.stats["bytes_read"] += n
            self._cache[w] = data
            while len(self._cache) > self.cache_windows:
                self._cache.popitem(last=False)
            return data
        finally:
            del self._loading[w]
            ev.set()

    async def aclose(self) -> None:
        self._cache.clear()
        if self._disk is not None:
            disk, self._disk = self._disk, None
            await disk.aclose()


def _load_for_capture(disk_uri: str, index_path: str, frozen: bool) -> DiskReferencer:
    try:
        index = DiskIndex.load(index_path)
    except DiskIndexError as e:
        raise CaptureError(f"index: {e}") from None
    try:
        parsed = parse_uri(disk_uri)
    except DiskError as e:
        raise CaptureError(str(e)) from None
    if index.disk != disk_uri:
        log.info("index %s was made from %s; referencing it as %s", index_path, index.disk,
                 disk_uri)
    if parsed.scheme == "file" and not frozen:
        ro, why = _file_read_only(parsed.path)
        if not ro:
            raise _refuse(disk_uri, why)
    if parsed.scheme == "rbd" and not parsed.snap and not frozen:
        raise _refuse(disk_uri, "an RBD image can change (name one of its snapshots: "
                                "rbd:POOL/IMAGE@SNAP)")
    return DiskReferencer(disk_uri, index, frozen)


def open_referencer(disk_uri: str, index_path: str, frozen: bool = False) -> DiskReferencer:
    """A Referencer for capture; raises CaptureError if the index cannot be
    loaded, or the disk is not read-only (and not ``frozen``), does not match
    the index, or cannot be opened.  Outside trio this connects once to
    check the disk (an NBD server must accept a later connection: qemu-nbd -t);
    inside trio, use :func:`aopen_referencer`, or the check happens on the
    first find()."""
    ref = _load_for_capture(disk_uri, index_path, frozen)
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        async def probe() -> None:
            await ref.open()
            await ref.aclose()
        trio.run(probe)
    return ref


async def aopen_referencer(disk_uri: str, index_path: str,
                           frozen: bool = False) -> DiskReferencer:
    """open_referencer for async callers: the disk stays open (aclose it)."""
    ref = _load_for_capture(disk_uri, index_path, frozen)
    await ref.open()
    return ref


# -- page map accounting (the mount's stats) ------------------------------------

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


# -- command -------------------------------------------------------------------

def _refuse_out_is_disk(disk_uri: str, out: str) -> None:
    """``--out`` must not be the disk itself (compared as files, not names)."""
    try:
        parsed = parse_uri(disk_uri)
        if parsed.scheme != "file":
            return
        a, b = os.stat(parsed.path), os.stat(out)
    except (DiskError, OSError):
        return
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        raise DiskIndexError(f"index {out} is the same file as disk {disk_uri}: refusing to "
                             "write into it")


def cmd_index(a: argparse.Namespace) -> int:
    base = None
    changed = None
    try:
        if a.base:
            base = DiskIndex.load(a.base)
        if a.changed_since:
            if base is None:
                print("memfs: --changed-since needs --base (the index of the backing chain)",
                      file=sys.stderr)
                return 2
            changed = changed_ranges_qcow2(a.changed_since)
    except DiskIndexError as e:
        print(f"memfs: base index: {e}", file=sys.stderr)
        return 1
    _refuse_out_is_disk(a.disk, a.out)
    index, res = trio.run(lambda: build_index(a.disk, base=base, changed=changed,
                                              progress=False if a.no_progress else None))
    try:
        index.save(a.out)
    except OSError as e:
        raise DiskIndexError(f"cannot write index {a.out}: {e.strerror}") from None
    res.index = a.out
    if a.json:
        print(json.dumps(res.as_dict(), indent=1))
    else:
        print(f"indexed {res.size} bytes of {res.disk} in {res.seconds:.2f}s ({res.mode}): "
              f"{res.entries} distinct blocks, {res.zero_blocks} zero blocks; read "
              f"{res.bytes_read / (1 << 20):.1f} MiB, hashed {res.blocks_hashed} blocks, "
              f"reused {res.chunks_reused} of {res.chunks_total} chunks")
        print(f"index: {a.out} ({os.path.getsize(a.out)} bytes)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="hash a disk's 4 KiB blocks for capture --disk/--index",
                       description="Hash every 4 KiB block of DISK (a path or an nbd:// URI) "
                                   "so that capture can refer to blocks instead of copying "
                                   "pages.")
    p.add_argument("disk", metavar="DISK", help="disk URI: a path, nbd://, nbd+unix://")
    p.add_argument("--out", required=True, metavar="INDEX", help="index file to write")
    p.add_argument("--base", metavar="INDEX",
                   help="an earlier index of this disk: re-hash only what changed")
    p.add_argument("--changed-since", metavar="OVERLAY.qcow2",
                   help="with --base: the disk is this qcow2 overlay over the chain --base "
                        "indexed; read only the ranges allocated in the overlay")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)
