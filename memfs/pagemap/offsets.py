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
It runs on 64 KiB of uint64s at a time, which stay in the CPU's cache.

A page map file (version 3) keeps a compact array as it is, and uint64s
otherwise.  A version 2 file, whose offsets are always uint64s, is packed
while it is read (:class:`Packer`, handed the file's bytes in chunks), and
a wide array is written a piece at a time (:meth:`Offsets.le_chunks`): the
uint64 form of a compact array never exists whole in memory (128 MiB at
16 Mi pages).
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
_CHUNK = 1 << 13
_ZERO = bytes(_CHUNK)


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
    def from_le(cls, data: bytes | bytearray | memoryview) -> "Offsets":
        """From little-endian uint64 bytes (a page map file): compact when
        every value fits, else the uint64 array."""
        view = memoryview(data).cast("B")
        if len(view) % 8:
            raise ValueError("offsets: a whole number of uint64s expected")
        p = Packer(len(view) // 8)
        step = 8 * _CHUNK
        for at in range(0, len(view), step):
            p.write(view[at:at + step] if isinstance(data, memoryview) else data[at:at + step])
        return p.result()

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
        return b"".join(_le_chunks(self.raw))

    def le_chunks(self) -> Iterator[bytes | bytearray | memoryview]:
        """The same bytes in pieces: a compact array is unpacked a piece at a
        time, never whole (a page map is saved without a uint64 copy)."""
        if not self.shift:
            yield _le_of(self.raw)
        else:
            yield from _le_chunks(self.raw)

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


class Packer:
    """Offsets built from little-endian uint64 bytes handed in chunks (a
    page map file as it is read): each chunk is packed as it comes, so the
    file's uint64s never exist whole in memory; the first value that does not
    fit turns the rest into the uint64 array.  A :class:`memfs.msgfile.Sink`."""

    def __init__(self, n: int) -> None:
        self.nbytes = 8 * n
        self._n, self._at = n, 0
        #: packed uint32s (on the way), or little-endian uint64s once widened
        self._out = array(_U32, [0]) * n if _U32 else array("Q", [0]) * n
        self._compact = bool(_U32)
        self._dst = memoryview(self._out).cast("B")

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """The next ``len(chunk) // 8`` values (``chunk`` is a multiple of 8
        bytes and is not kept; a memoryview is copied first, since its
        strided slices are slow)."""
        if isinstance(chunk, memoryview):
            chunk = chunk.tobytes()
        m = len(chunk) // 8
        if len(chunk) != 8 * m or self._at + m > self._n:
            raise ValueError("offsets: a chunk of whole uint64s within the array expected")
        if self._compact and not _pack_into(chunk, self._dst, 4 * self._at):
            self._widen()
        if not self._compact:
            self._dst[8 * self._at:8 * (self._at + m)] = chunk
        self._at += m

    def _widen(self) -> None:
        wide = array("Q", [0]) * self._n
        dst = memoryview(wide).cast("B")
        done = self._out[:self._at]
        if not _LITTLE:  # the packed part is little-endian until result()
            done.byteswap()
        at = 0
        for part in _le_chunks(done):
            dst[at:at + len(part)] = part
            at += len(part)
        self._out, self._dst, self._compact = wide, dst, False

    def result(self) -> "Offsets":
        """The offsets, once all ``nbytes`` were written."""
        if self._at != self._n:
            raise ValueError(f"offsets: {self._at} of {self._n} values written")
        out, self._out, self._dst = self._out, array("Q"), memoryview(b"")
        if not _LITTLE:
            out.byteswap()
        return Offsets(out, SHIFT if self._compact else 0)


def _pack_into(src: bytes | bytearray, dst: memoryview, at: int) -> bool:
    """Little-endian uint64s -> native uint32s of value >> 8 written at byte
    ``at`` of ``dst``; False (part of them written) if one does not fit (not
    a multiple of 256, or 1 TiB and more).  On bytes and bytearrays only:
    their strided slices are C loops, a memoryview's are not."""
    n = len(src) // 8
    zero, tmp = _ZERO, bytearray(4 * _CHUNK)
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        lo, hi = 8 * a, 8 * b
        if b - a != _CHUNK:
            zero, tmp = bytes(b - a), bytearray(4 * (b - a))
        if src[lo:hi:8] != zero or src[lo + 5:hi:8] != zero or src[lo + 6:hi:8] != zero \
                or src[lo + 7:hi:8] != zero:
            return False
        tmp[0::4] = src[lo + 1:hi:8]
        tmp[1::4] = src[lo + 2:hi:8]
        tmp[2::4] = src[lo + 3:hi:8]
        tmp[3::4] = src[lo + 4:hi:8]
        dst[at + 4 * a:at + 4 * b] = tmp
    return True


def _le_chunks(packed: array) -> Iterator[bytearray]:
    """Native uint32s of value >> 8 -> the values as little-endian uint64s,
    ``8 * _CHUNK`` bytes at a time (each chunk a new bytearray)."""
    if not _LITTLE:
        packed = array(_U32, packed)
        packed.byteswap()
    src = memoryview(packed).cast("B")
    n = len(packed)
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        part = bytes(src[4 * a:4 * b])
        out = bytearray(8 * (b - a))
        out[1::8] = part[0::4]
        out[2::8] = part[1::4]
        out[3::8] = part[2::4]
        out[4::8] = part[3::4]
        yield out
