"""The journal of a state directory (memfs.state): page-state changes since
the page map was installed, one 32-byte record each.

A record says "these pages are LOCAL now", because the guest WROTE them or
because they were fetched and KEPT; the store holds their bytes.  It is
written with a plain pwrite() after the store write and before the change
counts.  The file is preallocated in chunks (fallocate), so an append after a
successful store write normally cannot fail for want of space; its end is the
first all-zero record.  Each record carries an xxh3 of itself: a torn last
record ends the journal, a bad record followed by good ones is damage and the
state is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct

import xxhash

from .fileio import PRIVATE, create_new
from .pagemap import Region
from .store import fallocate

log = logging.getLogger("memfs.state")

JOURNAL_MAGIC = b"MEMFS-JL"
JOURNAL_VERSION = 1
HEADER = struct.Struct("<8sII16x")   # magic, version, region count: 32 bytes
RECORD = struct.Struct("<BBHIQQQ")   # kind, 0, region, count, first, seq, xxh3: 32 bytes
WROTE, KEPT = 1, 2
CHUNK = 1 << 20                       # journal preallocation step


class StateError(Exception):
    """The state directory cannot be used; the message says why."""


class Journal:
    """Append-only page-state changes; the hooks PageServer calls."""

    def __init__(self, path: str, names: list[str], fd: int, end: int) -> None:
        self.path = path
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.fd = fd
        self.end = end
        self.seq = (end - HEADER.size) // RECORD.size
        self.allocated = os.fstat(fd).st_size

    @classmethod
    def create(cls, path: str, names: list[str]) -> "Journal":
        fd = create_new(path, PRIVATE, os.O_RDWR | os.O_CLOEXEC)
        os.pwrite(fd, HEADER.pack(JOURNAL_MAGIC, JOURNAL_VERSION, len(names)), 0)
        j = cls(path, names, fd, HEADER.size)
        j._grow()
        return j

    @classmethod
    def open(cls, path: str, names: list[str]) -> tuple["Journal", dict[str, tuple[bytearray, bytearray]]]:
        """Open for appending; also return what it says: per region, the
        pages WROTE and KEPT (one byte per page, 1 = in the set)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise StateError(f"journal {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise StateError(f"journal {path} is not a regular file of ours")
            data = os.pread(fd, st.st_size, 0)
            sets, end = replay(data, len(names), where=path)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, names, fd, end), {n: sets[i] for i, n in enumerate(names)}

    def _grow(self) -> None:
        fallocate(self.fd, self.allocated, CHUNK)
        self.allocated = max(self.allocated + CHUNK, os.fstat(self.fd).st_size)

    def _append(self, records: list[tuple[int, int, int, int]]) -> None:
        out = bytearray()
        for kind, region, first, count in records:
            self.seq += 1
            head = RECORD.pack(kind, 0, region, count, first, self.seq, 0)[:24]
            out += head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
        if self.allocated - self.end < len(out) + (CHUNK // 4):
            try:
                self._grow()
            except OSError as e:  # room left is used first; the append fails only when none is
                log.warning("journal %s cannot grow: %s", self.path, e.strerror)
        n = os.pwrite(self.fd, out, self.end)
        if n != len(out):
            raise OSError(errno.ENOSPC, "short journal write")
        self.end += n

    def wrote(self, region: Region, first: int, count: int) -> None:
        """The guest wrote pages ``first..first+count-1`` (already in the store)."""
        self._append([(WROTE, self.index[region.name], first, count)])

    def kept(self, region: Region, pages: list[int]) -> None:
        """Fetched, verified ``pages`` are in the store now."""
        i = self.index[region.name]
        recs: list[tuple[int, int, int, int]] = []
        for p in sorted(pages):
            if recs and recs[-1][2] + recs[-1][3] == p:
                recs[-1] = (KEPT, i, recs[-1][2], recs[-1][3] + 1)
            else:
                recs.append((KEPT, i, p, 1))
        if recs:
            self._append(recs)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def replay(data: bytes, nregions: int, sizes: list[int] | None = None,
           where: str = "journal") -> tuple[list[tuple[bytearray, bytearray]], int]:
    """Parse a journal: per region (wrote, kept) page sets, and the byte
    offset where the next record goes.  Raises StateError on damage."""
    if len(data) < HEADER.size:
        raise StateError(f"{where}: too short to be a memfs journal")
    magic, version, count = HEADER.unpack_from(data, 0)
    if magic != JOURNAL_MAGIC:
        raise StateError(f"{where}: not a memfs journal")
    if version != JOURNAL_VERSION:
        raise StateError(f"{where}: journal version {version}, this memfs reads {JOURNAL_VERSION}")
    if count != nregions:
        raise StateError(f"{where}: journal of {count} regions, the mount has {nregions}")
    sets: list[tuple[bytearray, bytearray]] = [(bytearray(), bytearray())
                                               for _ in range(nregions)]
    at, seq = HEADER.size, 0
    zero = bytes(RECORD.size)
    while at + RECORD.size <= len(data):
        rec = data[at:at + RECORD.size]
        if rec == zero:
            break
        kind, pad, region, n, first, rseq, check = RECORD.unpack(rec)
        ok = (check == xxhash.xxh3_64_intdigest(rec[:24]) and kind in (WROTE, KEPT)
              and pad == 0 and region < nregions and n > 0 and rseq == seq + 1
              and first + n <= (sizes[region] if sizes else 1 << 40))
        if not ok:
            if any(data[at + RECORD.size:]):
                raise StateError(f"{where}: damaged record at byte {at}")
            log.warning("%s: torn last record at byte %d ignored", where, at)
            break
        seq = rseq
        s = sets[region][0 if kind == WROTE else 1]
        if len(s) < first + n:
            s.extend(bytes(first + n - len(s)))
        s[first:first + n] = b"\1" * n
        at += RECORD.size
    return sets, at
