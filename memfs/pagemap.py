"""The page map: per page of every region a state, a location and a checksum.

Pure data.  Per-page fields are packed arrays (one ``bytes`` each in the
msgpack file), so that 16 Mi pages load and save in well under a second and a
lying file cannot make us allocate more than the file itself holds.  The file
is a msgfile envelope (magic, version, xxh3-128 of the whole content): a
page map with a single flipped bit is refused, never half-trusted.
"""

from __future__ import annotations

import os
import sys
from array import array
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable, Iterator

import msgpack
import xxhash

from . import msgfile
from .fileio import atomic_write  # noqa: F401  (the one atomic_write; kept importable here)

MAGIC = b"MEMFS-PM"
VERSION = 2
PAGE_SIZE = 4096
MAX_DISKS = 255
MAX_REGIONS = 1024
MAX_PAGES = 1 << 32

_LITTLE = sys.byteorder == "little"


class PageMapError(Exception):
    """Raised for every malformed or inconsistent page map."""


FORMAT = msgfile.Format(MAGIC, VERSION, "page map", PageMapError, v1_magic="memfs-pagemap")


class PageState(IntEnum):
    ZERO = 0    # all zeros: no location, never fetched
    REMOTE = 1  # source bit set: the content is only on a disk
    LOCAL = 2   # the destination holds the page (fetched or written)


ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_CHECKSUM = xxhash.xxh3_64_intdigest(ZERO_PAGE)


def runs(flags: bytes | bytearray, value: int = 1) -> Iterator[tuple[int, int]]:
    """(first, end) of each run of bytes equal to ``value`` in ``flags`` (a
    byte per page: states, dirty or served bits), found with bytes.find."""
    if value != 1 or flags.translate(None, b"\0\1"):
        flags = flags.translate(bytes(int(b == value) for b in range(256)))
    at = flags.find(1)
    while at >= 0:
        end = flags.find(0, at)
        end = len(flags) if end < 0 else end
        yield at, end
        at = flags.find(1, end)


def checksum(data: bytes | memoryview) -> int:
    """The page checksum used everywhere: xxh3-64 of the page bytes."""
    return xxhash.xxh3_64_intdigest(data)


def u64_array(raw: bytes = b"") -> array:
    """Little-endian uint64s on disk -> a native array (page maps, indexes)."""
    a = array("Q")
    a.frombytes(raw)
    if not _LITTLE:
        a.byteswap()
    return a


def u64_bytes(a: array) -> bytes:
    """A native uint64 array -> little-endian bytes."""
    if _LITTLE:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


@dataclass
class Region:
    """One guest RAM block: served as one file named ``name``."""

    name: str
    size: int
    page_size: int = PAGE_SIZE
    states: bytearray = field(default_factory=bytearray)
    disks: bytearray = field(default_factory=bytearray)
    offsets: array = field(default_factory=u64_array)
    checksums: array = field(default_factory=u64_array)

    @classmethod
    def empty(cls, name: str, size: int, page_size: int = PAGE_SIZE) -> "Region":
        """A region whose pages are all zero pages."""
        _check_geometry(name, size, page_size)
        n = size // page_size
        r = cls(name, size, page_size, bytearray(n), bytearray(n), u64_array(bytes(8 * n)),
                u64_array(bytes(8 * n)))
        if n:
            r.checksums[0] = ZERO_CHECKSUM
            # Fill by doubling: much faster than a Python loop for 16 Mi pages.
            filled = 1
            while filled < n:
                step = min(filled, n - filled)
                r.checksums[filled:filled + step] = r.checksums[:step]
                filled += step
        return r

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    #: pages by state, kept current by the setters below once started
    tally: "Tally | None" = field(default=None, repr=False, compare=False)

    def state(self, page: int) -> PageState:
        return PageState(self.states[page])

    def start_tally(self, ndisks: int) -> "Tally":
        """Count the pages once (remote ones on disks 0..ndisks-1); from now
        on every state change must go through the setters (a mounted
        region's gauges read the tally)."""
        self.tally = Tally(self, ndisks)
        return self.tally

    def set_remote(self, page: int, disk: int, offset: int, csum: int) -> None:
        t = self.tally
        if t is not None:
            t.drop(self.states[page], self.disks[page])
            t.add(PageState.REMOTE, disk)
        self.states[page] = PageState.REMOTE
        self.disks[page] = disk
        self.offsets[page] = offset
        self.checksums[page] = csum

    def set_zero(self, page: int) -> None:
        t = self.tally
        if t is not None:
            t.drop(self.states[page], self.disks[page])
            t.add(PageState.ZERO, 0)
        self.states[page] = PageState.ZERO
        self.disks[page] = 0
        self.offsets[page] = 0
        self.checksums[page] = ZERO_CHECKSUM

    def set_state(self, page: int, state: PageState) -> None:
        """Change one page's state, its location left as it is."""
        t = self.tally
        if t is not None:
            d = self.disks[page]
            t.drop(self.states[page], d)
            t.add(state, d)
        self.states[page] = state

    def set_states(self, first: int, end: int, state: PageState) -> None:
        """Pages [first, end) to ``state``: counted in C, not page by page
        (a remote page among them is looked at alone, for its disk)."""
        t = self.tally
        if t is not None and end > first:
            old = self.states[first:end]
            n = end - first
            nz, nl = old.count(PageState.ZERO), old.count(PageState.LOCAL)
            t.zero -= nz
            t.local -= nl
            if nz + nl == 0 and self.disks.count(self.disks[first], first, end) == n:
                t.remote[self.disks[first]] -= n  # all remote on one disk: the usual keep
            elif nz + nl < n:
                disks = self.disks
                at = old.find(PageState.REMOTE)
                while at >= 0:
                    t.remote[disks[first + at]] -= 1
                    at = old.find(PageState.REMOTE, at + 1)
            if state == PageState.REMOTE:
                for p in range(first, end):
                    t.remote[self.disks[p]] += 1
            elif state == PageState.ZERO:
                t.zero += n
            else:
                t.local += n
        self.states[first:end] = bytes([state]) * (end - first)

    def count(self, state: PageState) -> int:
        return self.states.count(state)


class Tally:
    """A region's pages by state, and its remote pages by disk: counted once
    (``Region.start_tally``) and then moved by the Region's setters, so that
    a stats snapshot costs the same at 16 Mi pages as at 16."""

    __slots__ = ("zero", "local", "remote")

    def __init__(self, region: Region, ndisks: int) -> None:
        st = region.states
        self.zero = st.count(PageState.ZERO)
        self.local = st.count(PageState.LOCAL)
        #: remote pages by disk index
        self.remote = [0] * 256
        nremote = len(st) - self.zero - self.local
        if nremote:
            mask = st.translate(bytes(255 if i == PageState.REMOTE else 0 for i in range(256)))
            on = (int.from_bytes(mask, "little") & int.from_bytes(region.disks, "little")
                  ).to_bytes(len(st), "little")
            rest = nremote
            for d in range(1, min(ndisks, 256)):
                self.remote[d] = on.count(d)
                rest -= self.remote[d]
            self.remote[0] = rest

    @property
    def remote_total(self) -> int:
        return sum(self.remote)

    def drop(self, state: int, disk: int) -> None:
        if state == PageState.REMOTE:
            self.remote[disk] -= 1
        elif state == PageState.ZERO:
            self.zero -= 1
        else:
            self.local -= 1

    def add(self, state: int, disk: int) -> None:
        if state == PageState.REMOTE:
            self.remote[disk] += 1
        elif state == PageState.ZERO:
            self.zero += 1
        else:
            self.local += 1


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

    def _raw(self) -> list[memoryview]:
        out = []
        for r in self.regions:
            out += [memoryview(r.states), memoryview(r.disks), _le(r.offsets), _le(r.checksums)]
        return out

    def dumps(self) -> bytes:
        return msgfile.dumps(FORMAT, [self._doc()], self._raw())

    @classmethod
    def loads(cls, data: bytes | bytearray | memoryview) -> "PageMap":
        doc, raw = msgfile.loads_raw(FORMAT, data)
        bufs = _alloc(doc, len(raw))
        at = 0
        for buf in bufs:
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


# -- validation ------------------------------------------------------------

def check_region_name(name: Any) -> None:
    """A region is a file in the mount: a plain, visible file name."""
    if not isinstance(name, str) or not name or "/" in name or "\0" in name \
            or name.startswith(".") or len(name.encode(errors="replace")) > 255:
        raise PageMapError(f"bad region name {name!r}")


def _check_geometry(name: Any, size: Any, page_size: Any) -> None:
    check_region_name(name)
    if type(page_size) is not int or page_size < 4096 or page_size & (page_size - 1) \
            or page_size > 1 << 30:
        raise PageMapError(f"region {name!r}: bad page size {page_size!r}")
    if type(size) is not int or size <= 0 or size % page_size:
        raise PageMapError(f"region {name!r}: size {size!r} is not a positive multiple "
                           f"of the page size {page_size}")
    if size // page_size > MAX_PAGES:
        raise PageMapError(f"region {name!r}: too many pages")


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
        _check_geometry(name, size, page_size)
        if name in names:
            raise PageMapError(f"duplicate region name {name!r}")
        names.add(name)
        out.append((name, size, page_size))
    return out


def _alloc(doc: dict, raw_len: int) -> list[bytearray | array]:
    """Zeroed per-page arrays for the regions ``doc`` describes, once their
    total size is known to be the file's: a lying document cannot make us
    allocate more than the file holds."""
    npages = [size // ps for _, size, ps in _geometry(doc)]
    need = 18 * sum(npages)
    if need != raw_len:
        raise PageMapError(f"the regions need {need} bytes of per-page arrays, the file "
                           f"holds {raw_len}")
    bufs: list[bytearray | array] = []
    for n in npages:
        bufs += [bytearray(n), bytearray(n), array("Q", [0]) * n, array("Q", [0]) * n]
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
        states, pdisks, offsets, checksums = bufs[4 * k:4 * k + 4]
        if not _LITTLE:
            offsets.byteswap()
            checksums.byteswap()
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
