"""The page map and its file: disks and regions, saved as a msgfile
envelope (magic, version, xxh3-128 of the whole content) whose per-page
arrays are read straight into place.  A file that fails any check is
refused whole.  Pure data.

Version 3 keeps a region's offsets in the file as memory holds them: packed
uint32s (``offset >> 8``, the region's ``offset_shift`` 8) when they fit,
uint64s otherwise.  A 16 Mi page map is 22 % smaller than in version 2,
which held uint64s always (288 MiB against 224), and its packed offsets are
read straight into place.  Version 2 files are still read, their offsets
packed on the way in (offsets.Packer)."""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack

from .. import msgfile
from .offsets import _U32, SHIFT, Offsets, Packer
from .region import (_LITTLE, MAX_DISKS, MAX_REGIONS, PageMapError, PageState, Region,
                     check_geometry)

MAGIC = b"MEMFS-PM"
VERSION = 3

FORMAT = msgfile.Format(MAGIC, VERSION, "page map", PageMapError, v1_magic="memfs-pagemap",
                        older=(2,))


@dataclass
class PageMap:
    """Disks (URIs, indexed by the per-page disk field) and regions."""

    disks: list[str] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def disk_index(self, uri: str) -> int:
        """Index of ``uri`` in the disks table, adding it if new."""
        if uri in self.disks:
            return self.disks.index(uri)
        if len(self.disks) >= MAX_DISKS:
            raise PageMapError(f"too many disks (at most {MAX_DISKS})")
        self.disks.append(uri)
        return len(self.disks) - 1

    def counts(self) -> dict[str, int]:
        out = {"pages_total": 0, "pages_zero": 0, "pages_remote": 0, "pages_local": 0}
        for r in self.regions:
            out["pages_total"] += r.npages
            out["pages_zero"] += r.count(PageState.ZERO)
            out["pages_remote"] += r.count(PageState.REMOTE)
            out["pages_local"] += r.count(PageState.LOCAL)
        return out

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    # -- serialisation -----------------------------------------------------

    def _doc(self) -> bytes:
        """The msgpack document: disks, meta, and each region's geometry; the
        per-page arrays follow it in the file's raw tail, region by region
        (states, disks, offsets, checksums), written straight from memory."""
        regions = [{"name": r.name, "size": r.size, "page_size": r.page_size,
                    "offset_shift": r.offsets.shift} for r in self.regions]
        return msgpack.packb({"disks": list(self.disks), "meta": self.meta,
                              "regions": regions}, use_bin_type=True)

    def _raw(self) -> list[memoryview | msgfile.Source]:
        out: list[memoryview | msgfile.Source] = []
        for r in self.regions:
            offsets = _le(r.offsets.raw) if r.offsets.shift else _LeOffsets(r.offsets)
            out += [memoryview(r.states), memoryview(r.disks), offsets, _le(r.checksums)]
        return out

    def dumps(self) -> bytes:
        return msgfile.dumps(FORMAT, [self._doc()], self._raw())

    @classmethod
    def loads(cls, data: bytes | bytearray | memoryview) -> "PageMap":
        doc, raw = msgfile.loads_raw(FORMAT, data)
        bufs = _alloc(doc, len(raw))
        at = 0
        for buf in bufs:
            if isinstance(buf, Packer):
                for a in range(at, at + buf.nbytes, msgfile.SINK_CHUNK):
                    buf.write(bytearray(raw[a:min(a + msgfile.SINK_CHUNK, at + buf.nbytes)]))
                at += buf.nbytes
                continue
            view = memoryview(buf).cast("B")
            view[:] = raw[at:at + len(view)]
            at += len(view)
        return _build(doc, bufs)

    def save(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        """Write atomically, never through a symbolic link (raises OSError)."""
        msgfile.write(path, FORMAT, [self._doc()], self._raw(), mode=mode)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PageMap":
        """The arrays are read from the file straight into their places."""
        doc, bufs = msgfile.load_into(path, FORMAT, _alloc)
        try:
            return _build(doc, bufs)
        except PageMapError as e:
            raise PageMapError(f"{os.fspath(path)}: {e}") from None


def _le(a: array) -> memoryview:
    """An array's bytes as the file holds them, little-endian: the array
    itself here, a byte-swapped copy on a big-endian host (checksums,
    packed offsets)."""
    if _LITTLE:
        return memoryview(a).cast("B")
    b = array(a.typecode, a)
    b.byteswap()
    return memoryview(b).cast("B")


class _LeOffsets:
    """A region's offsets as the file holds them (little-endian uint64s),
    unpacked a piece at a time while the file is written (a msgfile.Source)."""

    def __init__(self, offsets: Offsets) -> None:
        self.offsets, self.nbytes = offsets, 8 * len(offsets)

    def chunks(self) -> Iterator[bytes | bytearray | memoryview]:
        return self.offsets.le_chunks()


# -- validation ------------------------------------------------------------

def get_field(d: dict, key: str, typ: type, where: str,
              error: type[Exception] = PageMapError) -> Any:
    """``d[key]`` of exactly type ``typ``, else ``error`` saying what is wrong
    (shared by every msgpack format memfs reads)."""
    if key not in d:
        raise error(f"{where}: missing {key!r}")
    v = d[key]
    if type(v) is not typ:
        raise error(f"{where}: {key!r} should be {typ.__name__}, not {type(v).__name__}")
    return v


def _geometry(doc: dict) -> list[tuple[str, int, int, int]]:
    """(name, size, page size, offset shift) of each region, checked; a
    version 2 region has no ``offset_shift``: its offsets are uint64s."""
    regions_doc = get_field(doc, "regions", list, "page map")
    if len(regions_doc) > MAX_REGIONS:
        raise PageMapError("page map: too many regions")
    out, names = [], set()
    for i, rd in enumerate(regions_doc):
        if not isinstance(rd, dict):
            raise PageMapError(f"region #{i} is not a map")
        where = f"region #{i}"
        name = get_field(rd, "name", str, where)
        size = get_field(rd, "size", int, where)
        page_size = get_field(rd, "page_size", int, where)
        check_geometry(name, size, page_size)
        shift = get_field(rd, "offset_shift", int, where) if "offset_shift" in rd else 0
        if shift not in (0, SHIFT):
            raise PageMapError(f"{where}: 'offset_shift' should be 0 or {SHIFT}, not {shift}")
        if shift and not _U32:
            raise PageMapError(f"{where}: packed offsets, and no 4-byte array type here")
        if name in names:
            raise PageMapError(f"duplicate region name {name!r}")
        names.add(name)
        out.append((name, size, page_size, shift))
    return out


def _alloc(doc: dict, raw_len: int) -> list[bytearray | array | Packer]:
    """Zeroed per-page arrays for the regions ``doc`` describes, once their
    total size is known to be the file's: a lying document cannot make us
    allocate more than the file holds.  Packed offsets are read straight
    into place; uint64 offsets are packed as they are read (a Packer), never
    held as the file's uint64s."""
    regions = [(size // ps, shift) for _, size, ps, shift in _geometry(doc)]
    need = sum(n * (18 - 4 * bool(shift)) for n, shift in regions)
    if need != raw_len:
        raise PageMapError(f"the regions need {need} bytes of per-page arrays, the file "
                           f"holds {raw_len}")
    bufs: list[bytearray | array | Packer] = []
    for n, shift in regions:
        offsets = array(_U32, [0]) * n if shift else Packer(n)
        bufs += [bytearray(n), bytearray(n), offsets, array("Q", [0]) * n]
    return bufs


def _build(doc: dict, bufs: list) -> PageMap:
    """The page map from its checked document and filled arrays."""
    disks = get_field(doc, "disks", list, "page map")
    if len(disks) > MAX_DISKS or not all(isinstance(u, str) and u for u in disks):
        raise PageMapError("page map: bad disks table")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise PageMapError("page map: 'meta' should be a map")
    pm = PageMap(disks=list(disks), meta=meta)
    for k, (name, size, ps, _) in enumerate(_geometry(doc)):
        states, pdisks, offsets, checksums = bufs[4 * k:4 * k + 4]
        if not _LITTLE:
            checksums.byteswap()
        if isinstance(offsets, Packer):
            offsets = offsets.result()
        else:
            if not _LITTLE:
                offsets.byteswap()
            offsets = Offsets(offsets, SHIFT)
        _check_pages(name, states, pdisks, len(disks))
        pm.regions.append(Region(name, size, ps, states, pdisks, offsets, checksums))
    return pm


def _check_pages(name: str, states: bytearray, disks: bytearray, ndisks: int) -> None:
    where = f"region {name!r}"
    if states.translate(None, bytes(PageState)):
        raise PageMapError(f"{where}: unknown page state")
    if PageState.REMOTE in states:
        if not ndisks:
            raise PageMapError(f"{where}: remote pages but no disks")
        if disks.translate(None, bytes(range(ndisks))):
            raise PageMapError(f"{where}: disk index out of range (have {ndisks} disks)")
