"""The page map and its file: disks and regions, saved as a msgfile
envelope (magic, version, xxh3-128 of the whole content) whose per-page
arrays are read straight into place.  A file that fails any check is
refused whole.  Pure data."""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack

from .. import msgfile
from .offsets import Offsets, Packer
from .region import (_LITTLE, MAX_DISKS, MAX_REGIONS, PageMapError, PageState, Region,
                     check_geometry, u64_bytes)

MAGIC = b"MEMFS-PM"
VERSION = 2

FORMAT = msgfile.Format(MAGIC, VERSION, "page map", PageMapError, v1_magic="memfs-pagemap")


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
        regions = [{"name": r.name, "size": r.size, "page_size": r.page_size}
                   for r in self.regions]
        return msgpack.packb({"disks": list(self.disks), "meta": self.meta,
                              "regions": regions}, use_bin_type=True)

    def _raw(self) -> list[memoryview | msgfile.Source]:
        out: list[memoryview | msgfile.Source] = []
        for r in self.regions:
            out += [memoryview(r.states), memoryview(r.disks), _LeOffsets(r.offsets),
                    _le(r.checksums)]
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
    return memoryview(a).cast("B") if _LITTLE else memoryview(u64_bytes(a))


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


def _geometry(doc: dict) -> list[tuple[str, int, int]]:
    """(name, size, page size) of each region, checked."""
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
        if name in names:
            raise PageMapError(f"duplicate region name {name!r}")
        names.add(name)
        out.append((name, size, page_size))
    return out


def _alloc(doc: dict, raw_len: int) -> list[bytearray | array | Packer]:
    """Zeroed per-page arrays for the regions ``doc`` describes, once their
    total size is known to be the file's: a lying document cannot make us
    allocate more than the file holds.  The offsets are packed as they are
    read (a Packer), never held as the file's uint64s."""
    npages = [size // ps for _, size, ps in _geometry(doc)]
    need = 18 * sum(npages)
    if need != raw_len:
        raise PageMapError(f"the regions need {need} bytes of per-page arrays, the file "
                           f"holds {raw_len}")
    bufs: list[bytearray | array | Packer] = []
    for n in npages:
        bufs += [bytearray(n), bytearray(n), Packer(n), array("Q", [0]) * n]
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
    for k, (name, size, ps) in enumerate(_geometry(doc)):
        states, pdisks, packer, checksums = bufs[4 * k:4 * k + 4]
        if not _LITTLE:
            checksums.byteswap()
        _check_pages(name, states, pdisks, len(disks))
        pm.regions.append(Region(name, size, ps, states, pdisks, packer.result(), checksums))
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
