"""Pages in memory: the page states, the primitives every layer uses on
per-page bytes (runs, checksum, packed uint64 arrays), a region and its
tally of pages by state.  Pure data."""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterator

import xxhash

from .offsets import Offsets

PAGE_SIZE = 4096
MAX_DISKS = 255
MAX_REGIONS = 1024
MAX_PAGES = 1 << 32

_LITTLE = sys.byteorder == "little"


class PageMapError(Exception):
    """Raised for every malformed or inconsistent page map."""


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
    #: compact when they allow (memfs.pagemap.offsets); an array('Q') given is converted
    offsets: Offsets = field(default_factory=Offsets)
    checksums: array = field(default_factory=u64_array)

    def __post_init__(self) -> None:
        if not isinstance(self.offsets, Offsets):
            self.offsets = Offsets.of(self.offsets)

    @classmethod
    def empty(cls, name: str, size: int, page_size: int = PAGE_SIZE) -> "Region":
        """A region whose pages are all zero pages."""
        check_geometry(name, size, page_size)
        n = size // page_size
        r = cls(name, size, page_size, bytearray(n), bytearray(n), Offsets.zeros(n),
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
        if nremote and ndisks > 1:  # with one disk, every remote page is on disk 0
            mask = st.translate(bytes(255 if i == PageState.REMOTE else 0 for i in range(256)))
            on = (int.from_bytes(mask, "little") & int.from_bytes(region.disks, "little")
                  ).to_bytes(len(st), "little")
            rest = nremote
            for d in range(1, min(ndisks, 256)):
                self.remote[d] = on.count(d)
                rest -= self.remote[d]
            self.remote[0] = rest
        else:
            self.remote[0] = nremote

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


def check_region_name(name: Any) -> None:
    """A region is a file in the mount: a plain, visible file name."""
    if not isinstance(name, str) or not name or "/" in name or "\0" in name \
            or name.startswith(".") or len(name.encode(errors="replace")) > 255:
        raise PageMapError(f"bad region name {name!r}")


def check_geometry(name: Any, size: Any, page_size: Any) -> None:
    check_region_name(name)
    if type(page_size) is not int or page_size < 4096 or page_size & (page_size - 1) \
            or page_size > 1 << 30:
        raise PageMapError(f"region {name!r}: bad page size {page_size!r}")
    if type(size) is not int or size <= 0 or size % page_size:
        raise PageMapError(f"region {name!r}: size {size!r} is not a positive multiple "
                           f"of the page size {page_size}")
    if size // page_size > MAX_PAGES:
        raise PageMapError(f"region {name!r}: too many pages")
