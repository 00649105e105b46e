"""Versioned, checksummed msgpack files: page maps, disk indexes, traces.

Why: these files describe memory.  One flipped bit that turns a remote page
into a zero page makes memfs serve zeros for a non-zero page, with nothing
to notice it (DESIGN.md invariant 8).  So every such file is an envelope
around its msgpack document, checked whole before a byte of it is parsed:

    offset  size  field
    0       8     magic, one per format (b"MEMFS-PM", b"MEMFS-IX", b"MEMFS-TR")
    8       4     format version, little-endian uint32
    12      4     reserved, zero
    16      8     length of the document, little-endian uint64
    24      16    xxh3-128 of bytes 0..24 followed by the document
    40      -     the msgpack document

The checksum covers everything but itself; the length must match the file
exactly, so truncation and appended bytes are caught before hashing.
xxh3-128 runs at many GB/s: checking a 300 MB page map costs a few tens of
milliseconds.  Version-1 files (bare msgpack, no envelope, no checksum) are
recognised and refused with a message that says so.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import msgpack
import xxhash

from .fileio import PRIVATE, atomic_write

_HEAD = struct.Struct("<8sIIQ")
HEADER_SIZE = _HEAD.size + 16


@dataclass(frozen=True)
class Format:
    """One file format: its magic, its version, how to name it, its error."""

    magic: bytes
    version: int
    what: str                    # "page map", "disk index", "trace"
    error: type[Exception]
    v1_magic: str = ""           # the msgpack "magic" value of version-1 files
    not_a: str = ""              # "not a ..." for a file of another kind

    @property
    def kind(self) -> str:
        return self.not_a or f"msgpack {self.what}"

    def fail(self, why: str) -> Exception:
        return self.error(why)


def _digest(head: bytes, chunks: Iterable[bytes | memoryview]) -> bytes:
    h = xxhash.xxh3_128(head)
    for c in chunks:
        h.update(c)
    return h.digest()


def envelope(fmt: Format, chunks: Iterable[bytes | memoryview]) -> list[bytes | memoryview]:
    """The file as chunks: header, then ``chunks`` unchanged (no copy of the
    large per-page arrays)."""
    body = list(chunks)
    length = sum(memoryview(c).nbytes for c in body)
    head = _HEAD.pack(fmt.magic, fmt.version, 0, length)
    return [head + _digest(head, body), *body]


def dumps(fmt: Format, chunks: Iterable[bytes | memoryview]) -> bytes:
    return b"".join(envelope(fmt, chunks))


def write(path: str | os.PathLike[str], fmt: Format, chunks: Iterable[bytes | memoryview],
          mode: int = PRIVATE) -> None:
    """Write the file atomically (fileio.atomic_write); raises OSError."""
    atomic_write(path, envelope(fmt, chunks), mode=mode)


def body(fmt: Format, data: bytes | bytearray | memoryview) -> memoryview:
    """The checked document bytes of a whole file, or ``fmt.error``."""
    view = memoryview(data).cast("B")
    if len(view) < HEADER_SIZE or view[:8] != fmt.magic:
        if _looks_v1(fmt, view):
            raise fmt.fail(f"a version 1 {fmt.what} (no checksum), written by an older memfs: "
                           f"this memfs reads version {fmt.version} only; make it again")
        raise fmt.fail(f"not a {fmt.kind} (bad magic)")
    magic, version, reserved, length = _HEAD.unpack_from(view)
    if version != fmt.version:
        raise fmt.fail(f"unsupported {fmt.what} version {version} (this memfs reads "
                       f"{fmt.version})")
    if reserved or length != len(view) - HEADER_SIZE:
        raise fmt.fail(f"{fmt.what} is truncated or has trailing bytes (header says "
                       f"{length} bytes of content, the file holds {len(view) - HEADER_SIZE})")
    doc = view[HEADER_SIZE:]
    if _digest(bytes(view[:_HEAD.size]), [doc]) != view[_HEAD.size:HEADER_SIZE]:
        raise fmt.fail(f"{fmt.what} checksum mismatch: the file is corrupt")
    return doc


def _looks_v1(fmt: Format, view: memoryview) -> bool:
    """A bare msgpack map whose first entry is ``"magic": fmt.v1_magic``."""
    if not fmt.v1_magic or not len(view) or not (0x80 <= view[0] <= 0x8f or view[0] in
                                                   (0xde, 0xdf)):
        return False
    return msgpack.packb(fmt.v1_magic) in bytes(view[:64])


def loads(fmt: Format, data: bytes | bytearray | memoryview) -> Any:
    """The checked, decoded document (a map), or ``fmt.error``."""
    doc = body(fmt, data)
    try:
        out = msgpack.unpackb(doc, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types on garbage
        raise fmt.fail(f"not a {fmt.kind}: {e}") from None
    if not isinstance(out, dict):
        raise fmt.fail(f"not a {fmt.what} (top level is not a map)")
    return out


def read(path: str | os.PathLike[str], fmt: Format) -> bytearray:
    """The whole file, or ``fmt.error`` naming it.  Read into one buffer
    sized by fstat: no growing copies of a large page map."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise fmt.fail(f"cannot read {fmt.what} {os.fspath(path)}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = os.fstat(fd).st_size
            buf = bytearray(size)
            view, got = memoryview(buf), 0
            while got < size:  # one read returns at most 2 GiB
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != size or f.read(1):
                raise fmt.fail(f"{os.fspath(path)}: the {fmt.what} changed while it was read")
    except OSError as e:
        raise fmt.fail(f"cannot read {fmt.what} {os.fspath(path)}: {e.strerror}") from None
    return buf


def load(path: str | os.PathLike[str], fmt: Format) -> Any:
    """``loads`` of the file at ``path``; errors name the file."""
    data = read(path, fmt)
    try:
        return loads(fmt, data)
    except fmt.error as e:
        raise fmt.fail(f"{os.fspath(path)}: {e}") from None


def iter_bin(pk: msgpack.Packer, key: str, buf: memoryview) -> Iterator[bytes | memoryview]:
    """``key`` and a bin32 holding ``buf``, without copying ``buf``."""
    yield pk.pack(key) + b"\xc6" + len(buf).to_bytes(4, "big")
    yield buf
