"""A region's per-page byte offsets, kept in half the memory when they allow.

Why: a 64 GiB region has 16 Mi pages; as uint64s their offsets take 128 MiB
of the daemon's RSS (issue 11 wants the whole daemon within 0.5 % of the
region).  Page contents sit on disks at offsets aligned to at least 512
bytes, and below 1 TiB on any volume memfs writes, so ``offset >> 8`` fits
in a uint32: 64 MiB.  Any region whose offsets do not all fit is kept in the
plain uint64 array, and an assignment of a value that no longer fits widens
the array in place: a value is never lost or rounded.

The packing runs on bytes, at C speed: the uint32 ``offset >> 8`` is bytes
1..4 of the little-endian uint64, so it is four strided byte slices, and
"fits" is bytes 0 and 5..7 being zero.  No Python loop visits 16 Mi entries.

The page map FILE keeps uint64s (:meth:`Offsets.le_bytes`, :meth:`from_le`).
Hot loops read :attr:`raw` and :attr:`shift` once (``raw[p] << shift``)
instead of paying a Python ``__getitem__`` per page; they must read them
again after anything that may assign, since a widening replaces :attr:`raw`.
"""

from __future__ import annotations

import sys
from array import array
from typing import Any, Iterable, Iterator

_LITTLE = sys.byteorder == "little"
#: the compact form: uint32 in units of 2**SHIFT bytes, for offsets below LIMIT
SHIFT = 8
LIMIT = 1 << (32 + SHIFT)
_U32 = "I" if array("I").itemsize == 4 else ""  # no compact form without a 4-byte type
#: entries packed per step: small enough for the byte slices to stay in cache
_CHUNK = 1 << 14


class Offsets:
    """Per-page byte offsets: indexing, item and slice assignment, slices,
    copies, comparison, like the ``array('Q')`` it replaces."""

    __slots__ = ("raw", "shift")
    __hash__ = None  # type: ignore[assignment]  # mutable, like array

    def __init__(self, raw: array | None = None, shift: int = 0) -> None:
        #: the stored values: uint32 ``offset >> shift`` (shift 8) or uint64 (shift 0)
        self.raw: array = array("Q") if raw is None else raw
        self.shift = shift

    # -- construction ------------------------------------------------------

    @classmethod
    def zeros(cls, n: int) -> "Offsets":
        """``n`` zero offsets (compact)."""
        if not _U32:
            return cls(array("Q", bytes(8 * n)))
        return cls(array(_U32, bytes(4 * n)), SHIFT)

    @classmethod
    def from_le(cls, data: bytes | bytearray) -> "Offsets":
        """From little-endian uint64 bytes (a page map file): compact when
        every value fits, else the uint64 array."""
        packed = _pack(data)
        if packed is not None:
            return cls(packed, SHIFT)
        wide = array("Q")
        wide.frombytes(data)
        if not _LITTLE:
            wide.byteswap()
        return cls(wide)

    @classmethod
    def of(cls, values: "Offsets | array | Iterable[int]") -> "Offsets":
        """A new Offsets holding ``values`` (an Offsets is copied as it is;
        anything else is checked as uint64s would be, then packed if it fits)."""
        if isinstance(values, Offsets):
            return values.copy()
        wide = values if isinstance(values, array) and values.typecode == "Q" \
            else array("Q", values)
        return cls.from_le(_le_of(wide))

    def copy(self) -> "Offsets":
        return Offsets(array(self.raw.typecode, self.raw), self.shift)

    # -- reading -----------------------------------------------------------

    @property
    def compact(self) -> bool:
        return self.shift != 0

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return Offsets(self.raw[i], self.shift)
        return self.raw[i] << self.shift

    def __iter__(self) -> Iterator[int]:
        if not self.shift:
            return iter(self.raw)
        return map(self.shift.__rlshift__, self.raw)

    def wide(self) -> array:
        """The values as a native uint64 array (a copy)."""
        if not self.shift:
            return array("Q", self.raw)
        out = array("Q")
        out.frombytes(self.le_bytes())
        if not _LITTLE:
            out.byteswap()
        return out

    def le_bytes(self) -> bytes | bytearray | memoryview:
        """The values as little-endian uint64 bytes (the page map file)."""
        if not self.shift:
            return _le_of(self.raw)
        return _unpack(self.raw)

    def tobytes(self) -> bytes:
        """Native uint64 bytes, as ``array('Q').tobytes()`` gives."""
        return self.wide().tobytes()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Offsets):
            if other.shift == self.shift:
                return self.raw == other.raw
            return len(self) == len(other) and self.le_bytes() == other.le_bytes()
        if isinstance(other, array) and other.typecode == "Q":
            return len(self) == len(other) and self.le_bytes() == _le_of(other)
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        form = f"uint32 << {self.shift}" if self.shift else "uint64"
        return f"Offsets({len(self)} pages, {form})"

    # -- writing -----------------------------------------------------------

    def __setitem__(self, i: Any, value: Any) -> None:
        if isinstance(i, slice):
            self._set_slice(i, value)
            return
        if self.shift:
            if value & 0xFF == 0 and 0 <= value < LIMIT:
                self.raw[i] = value >> SHIFT
                return
            array("Q", [value])  # a value no uint64 holds fails here, before widening,
            self.raw[i]  # and so does an index out of range
            self._widen()
        self.raw[i] = value

    def _set_slice(self, i: slice, values: Any) -> None:
        v = values if isinstance(values, Offsets) else Offsets.of(values)
        if v.shift == self.shift:
            self.raw[i] = v.raw
        elif not self.shift:
            self.raw[i] = v.wide()
        else:  # ours compact, theirs do not fit: widen ours
            self._widen()
            self.raw[i] = v.raw

    def _widen(self) -> None:
        self.raw, self.shift = self.wide(), 0


def _le_of(wide: array) -> bytes | memoryview:
    """Little-endian bytes of a native uint64 array (no copy on little-endian)."""
    if _LITTLE:
        return memoryview(wide).cast("B")
    b = array("Q", wide)
    b.byteswap()
    return b.tobytes()


def _pack(data: bytes | bytearray | memoryview) -> array | None:
    """Little-endian uint64s -> native uint32s of value >> 8, or None if one
    of them does not fit (not a multiple of 256, or 1 TiB and more)."""
    n = len(data) // 8
    if not _U32 or len(data) != 8 * n:
        return None
    out = array(_U32, [0]) * n  # faster than from bytes(4 * n) (no copy of zeros)
    dst = memoryview(out).cast("B")
    zero = bytes(_CHUNK)
    tmp = bytearray(4 * _CHUNK)
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        lo, hi, m = 8 * a, 8 * b, b - a
        if isinstance(data, memoryview):  # its strided slices are slow: copy the chunk
            src, base = bytes(data[lo:hi]), 0
        else:
            src, base = data, lo
        end = base + 8 * m
        if m != _CHUNK:
            zero, tmp = bytes(m), bytearray(4 * m)
        for k in (0, 5, 6, 7):
            if src[base + k:end:8] != zero:
                return None
        for k in range(4):
            tmp[k::4] = src[base + k + 1:end:8]
        dst[4 * a:4 * b] = tmp
    if not _LITTLE:
        out.byteswap()
    return out


def _unpack(packed: array) -> bytearray:
    """Native uint32s of value >> 8 -> the values as little-endian uint64s."""
    n = len(packed)
    if not _LITTLE:
        packed = array(_U32, packed)
        packed.byteswap()
    src = memoryview(packed).cast("B")
    out = bytearray(8 * n)
    dst = memoryview(out)
    tmp = bytearray(8 * _CHUNK)
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        if b - a != _CHUNK:
            tmp = bytearray(8 * (b - a))
        part = bytes(src[4 * a:4 * b])
        for k in range(4):
            tmp[k + 1::8] = part[k::4]
        dst[8 * a:8 * b] = tmp
    return out
