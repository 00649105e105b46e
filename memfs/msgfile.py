"""Versioned, checksummed msgpack files: page maps, disk indexes, traces.

Why: these files describe memory.  One flipped bit that turns a remote page
into a zero page makes memfs serve zeros for a non-zero page, with nothing
to notice it (DESIGN.md invariant 8).  So every such file is an envelope
around its msgpack document, checked whole before anything in it is used:

    offset  size  field
    0       8     magic, one per format (b"MEMFS-PM", b"MEMFS-IX", b"MEMFS-TR")
    8       4     format version, little-endian uint32
    12      4     length of the msgpack document, little-endian uint32
    16      8     length of everything after the header, little-endian uint64
    24      8     xxh3-64 of bytes 0..24 and the document, little-endian
    32      16    xxh3-128 of bytes 0..32, the document and the raw tail
    48      -     the msgpack document, then the raw tail

The raw tail holds large packed arrays (a page map's per-page fields) that
the document describes: a loader reads them straight from the file into
their final arrays (:func:`load_into`), without msgpack's copies — a 16 Mi
page map loads about twice as fast — or has them handed over in small chunks
as they are read, to convert on the way (a :class:`Sink`: a page map packs
its offsets so, without a temporary of the whole array).  A writer may give
a part of the tail as a :class:`Source` that makes it a piece at a time.
Disk indexes and traces have no tail.

The lengths must match the file exactly, so truncation and appended bytes
are caught first; the document's own checksum is checked before it is
parsed, the whole checksum before anything is returned.  xxh3 runs at many
GB/s, and each piece is hashed right after it is read, while it is in the
CPU's cache: checking a 300 MB page map costs about 6 ms.  Version-1 files (bare
msgpack, no envelope, no checksum) are recognised and refused by name.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import msgpack
import xxhash

from .fileio import PRIVATE, atomic_write

_HEAD = struct.Struct("<8sIIQ")
_DOCSUM = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + 8 + 16
MAX_DOC = (1 << 32) - 1

Buffer = bytes | bytearray | memoryview

#: the raw tail is read (and checksummed while it is in the CPU's cache) this
#: much at a time
READ_CHUNK = 1 << 20
#: what a Sink is handed at a time: whole uint64s, small enough for its
#: conversion to run in cache
SINK_CHUNK = 1 << 18


@runtime_checkable
class Sink(Protocol):
    """A part of the raw tail that is not read in place but handed over in
    chunks as it is read: ``SINK_CHUNK`` bytes each (a multiple of 8), the
    last one shorter,
    each valid only during the call.  A loader converts it on the way (a page
    map packs its offsets) without a temporary copy of the whole array.  The
    chunks come before the whole checksum is known: nothing built from them
    may be used unless :func:`load_into` returns."""

    nbytes: int

    def write(self, chunk: bytearray) -> None: ...


@runtime_checkable
class Source(Protocol):
    """A part of the raw tail produced in pieces when it is written (a page
    map's packed offsets, unpacked a piece at a time): ``chunks()`` may be
    called more than once and gives the same ``nbytes`` bytes each time."""

    nbytes: int

    def chunks(self) -> Iterable[Buffer]: ...


@dataclass(frozen=True)
class Format:
    """One file format: its magic, its version, how to name it, its error."""

    magic: bytes
    version: int
    what: str                    # "page map", "disk index", "trace"
    error: type[Exception]
    v1_magic: str = ""           # the msgpack "magic" value of version-1 files
    not_a: str = ""              # "not a ..." for a file of another kind
    older: tuple[int, ...] = ()  # earlier versions still read (written: ``version`` only)

    @property
    def kind(self) -> str:
        return self.not_a or f"msgpack {self.what}"

    @property
    def reads(self) -> str:
        """The versions this memfs reads, for messages: "2", "2 and 3"."""
        return " and ".join(str(v) for v in sorted({*self.older, self.version}))

    def fail(self, why: str) -> Exception:
        return self.error(why)


Part = Buffer | Sink | Source


def _nbytes(chunks: Iterable[Part]) -> int:
    return sum(c.nbytes if isinstance(c, (Sink, Source)) else memoryview(c).nbytes
               for c in chunks)


def _pieces(parts: Iterable[Buffer | Source]) -> Iterator[Buffer]:
    for c in parts:
        if isinstance(c, Source):
            yield from c.chunks()
        else:
            yield c


def envelope(fmt: Format, doc: Iterable[Buffer],
             raw: Sequence[Buffer | Source] = ()) -> Iterator[Buffer]:
    """The file as chunks: header, document, raw tail (not copied; a Source
    is gone through twice, for the checksum and for the chunks)."""
    docs = list(doc)
    doc_len = _nbytes(docs)
    if doc_len > MAX_DOC:
        raise fmt.fail(f"{fmt.what} document too large ({doc_len} bytes)")
    head = _HEAD.pack(fmt.magic, fmt.version, doc_len, doc_len + _nbytes(raw))
    h = xxhash.xxh3_64(head)
    for c in docs:
        h.update(c)
    head += _DOCSUM.pack(h.intdigest())
    whole = xxhash.xxh3_128(head)
    for c in _pieces((*docs, *raw)):
        whole.update(c)
    return _pieces((head + whole.digest(), *docs, *raw))


def dumps(fmt: Format, doc: Iterable[Buffer], raw: Sequence[Buffer | Source] = ()) -> bytes:
    return b"".join(memoryview(c).cast("B") for c in envelope(fmt, doc, raw))


def write(path: str | os.PathLike[str], fmt: Format, doc: Iterable[Buffer],
          raw: Sequence[Buffer | Source] = (), mode: int = PRIVATE) -> None:
    """Write the file atomically (fileio.atomic_write); raises OSError."""
    atomic_write(path, envelope(fmt, doc, raw), mode=mode)


def _header(fmt: Format, view: memoryview, file_size: int) -> tuple[int, int]:
    """(document length, tail length) from a checked header."""
    if len(view) < HEADER_SIZE or view[:8] != fmt.magic:
        if _looks_v1(fmt, view):
            raise fmt.fail(f"a version 1 {fmt.what} (no checksum), written by an older memfs: "
                           f"this memfs reads version{'s' if fmt.older else ''} {fmt.reads} "
                           "only; make it again")
        raise fmt.fail(f"not a {fmt.kind} (bad magic)")
    _, version, doc_len, length = _HEAD.unpack_from(view)
    if version != fmt.version and version not in fmt.older:
        raise fmt.fail(f"unsupported {fmt.what} version {version} (this memfs reads "
                       f"{fmt.reads})")
    if length != file_size - HEADER_SIZE or doc_len > length:
        raise fmt.fail(f"{fmt.what} is truncated or has trailing bytes (header says "
                       f"{length} bytes of content, the file holds {file_size - HEADER_SIZE})")
    return doc_len, length - doc_len


def _decode(fmt: Format, head: memoryview, doc: memoryview) -> dict:
    """The document, once its checksum holds."""
    h = xxhash.xxh3_64(head[:_HEAD.size])
    h.update(doc)
    if _DOCSUM.pack(h.intdigest()) != head[_HEAD.size:_HEAD.size + 8]:
        raise _corrupt(fmt)
    try:
        out = msgpack.unpackb(doc, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types on garbage
        raise fmt.fail(f"not a {fmt.kind}: {e}") from None
    if not isinstance(out, dict):
        raise fmt.fail(f"not a {fmt.kind} (top level is not a map)")
    return out


def _corrupt(fmt: Format) -> Exception:
    return fmt.fail(f"{fmt.what} checksum mismatch: the file is corrupt")


def loads_raw(fmt: Format, data: Buffer) -> tuple[dict, memoryview]:
    """The checked document and raw tail of a whole file held in memory."""
    view = memoryview(data).cast("B")
    doc_len, _ = _header(fmt, view, len(view))
    doc = _decode(fmt, view[:HEADER_SIZE], view[HEADER_SIZE:HEADER_SIZE + doc_len])
    whole = xxhash.xxh3_128(view[:HEADER_SIZE - 16])
    whole.update(view[HEADER_SIZE:])
    if whole.digest() != view[HEADER_SIZE - 16:HEADER_SIZE]:
        raise _corrupt(fmt)
    return doc, view[HEADER_SIZE + doc_len:]


def loads(fmt: Format, data: Buffer) -> dict:
    """The checked document of a file without a raw tail."""
    doc, raw = loads_raw(fmt, data)
    if len(raw):
        raise fmt.fail(f"{fmt.what}: {len(raw)} unexpected bytes after the document")
    return doc


def _looks_v1(fmt: Format, view: memoryview) -> bool:
    """A bare msgpack map whose first entry is ``"magic": fmt.v1_magic``."""
    if not fmt.v1_magic or not len(view) or not (0x80 <= view[0] <= 0x8f or view[0] in
                                                   (0xde, 0xdf)):
        return False
    return msgpack.packb(fmt.v1_magic) in bytes(view[:64])


def _readinto(fd: int, view: memoryview) -> int:
    got = 0
    while got < len(view):  # one read returns at most 2 GiB
        n = os.readv(fd, [view[got:]])
        if not n:
            break
        got += n
    return got


def _open(path: str | os.PathLike[str], fmt: Format) -> tuple[int, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise fmt.fail(f"cannot read {fmt.what} {os.fspath(path)}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000):
            raise fmt.fail(f"cannot read {fmt.what} {os.fspath(path)}: not a regular file")
        os.set_blocking(fd, True)
        _advise_whole(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _advise_whole(fd: int) -> None:
    """The whole file is read, in order: the kernel starts reading it from
    the disk while the loader allocates (a cold file).  Advice only."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass


Alloc = Callable[[dict, int], Sequence[Buffer | Sink]]


def _read_tail(fd: int, fmt: Format, bufs: Sequence[Buffer | Sink], whole: Any) -> None:
    """Fill ``bufs`` from ``fd`` in order, each piece added to the checksum
    ``whole`` right after it is read, while it is still in the CPU's cache."""
    scratch = bytearray(SINK_CHUNK)
    for b in bufs:
        if isinstance(b, Sink):
            left = b.nbytes
            while left:
                chunk = scratch if left >= SINK_CHUNK else bytearray(left)
                if _readinto(fd, memoryview(chunk)) != len(chunk):
                    raise fmt.fail(f"{fmt.what} changed while it was read")
                whole.update(chunk)
                b.write(chunk)
                left -= len(chunk)
            continue
        v = memoryview(b).cast("B")
        for at in range(0, len(v), READ_CHUNK):
            piece = v[at:at + READ_CHUNK]
            if _readinto(fd, piece) != len(piece):
                raise fmt.fail(f"{fmt.what} changed while it was read")
            whole.update(piece)


def load_into(path: str | os.PathLike[str], fmt: Format,
              alloc: Alloc | None = None) -> tuple[dict, Sequence[Buffer | Sink]]:
    """Read and check the file at ``path``: its document, and its raw tail
    read straight into the writable buffers ``alloc(document, tail length)``
    returns, or handed to those of them that are a :class:`Sink` as it is
    read (``alloc`` raises ``fmt.error`` unless their sizes add up to the
    tail length, before it allocates them).  Errors are ``fmt.error`` naming
    the file; nothing is returned unless the whole checksum holds."""
    name = os.fspath(path)
    fd, size = _open(path, fmt)
    try:
        head = memoryview(bytearray(min(size, HEADER_SIZE)))
        if _readinto(fd, head) != len(head):
            raise fmt.fail(f"{fmt.what} changed while it was read")
        doc_len, raw_len = _header(fmt, head, size)
        doc_buf = memoryview(bytearray(doc_len))
        if _readinto(fd, doc_buf) != doc_len:
            raise fmt.fail(f"{fmt.what} changed while it was read")
        doc = _decode(fmt, head, doc_buf)
        bufs = alloc(doc, raw_len) if alloc else [bytearray(raw_len)]
        if _nbytes(bufs) != raw_len:
            raise fmt.fail(f"{fmt.what}: the document describes {_nbytes(bufs)} bytes of "
                           f"arrays, the file holds {raw_len}")
        whole = xxhash.xxh3_128(head[:HEADER_SIZE - 16])
        whole.update(doc_buf)
        _read_tail(fd, fmt, bufs, whole)
        if os.read(fd, 1):
            raise fmt.fail(f"{fmt.what} changed while it was read")
        if whole.digest() != head[HEADER_SIZE - 16:]:
            raise _corrupt(fmt)
        return doc, bufs
    except OSError as e:
        raise fmt.fail(f"cannot read {fmt.what} {name}: {e.strerror}") from None
    except fmt.error as e:
        raise fmt.fail(f"{name}: {e}") from None
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str], fmt: Format) -> dict:
    """The checked document of the file at ``path`` (no raw tail)."""
    doc, bufs = load_into(path, fmt, lambda d, n: [bytearray(n)] if n else [])
    if _nbytes(bufs):
        raise fmt.fail(f"{os.fspath(path)}: {fmt.what}: unexpected bytes after the document")
    return doc
