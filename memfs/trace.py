"""Working-set traces: the order in which pages were first demanded.

A later mount of the same image fetches these pages first (the REAP and
FaaSnap idea): a guest that resumes tends to touch what it touched before.
Stored as msgpack with packed uint32 page arrays in a msgfile envelope
(magic, version, checksum of the whole content), validated like page maps.
"""

from __future__ import annotations

import sys
from array import array

import msgpack

from . import msgfile

MAGIC = b"MEMFS-TR"
VERSION = 2
MAX_ENTRIES = 1 << 32


class TraceError(Exception):
    """A trace file is unreadable or malformed."""


FORMAT = msgfile.Format(MAGIC, VERSION, "trace", TraceError, v1_magic="memfs-trace",
                        not_a="trace")


def pack_pages(pages: "list[int] | array") -> bytes:
    """Page indexes as little-endian uint32s (traces, hot pages in page maps)."""
    a = array("I", pages)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def unpack_pages(raw: bytes) -> array:
    if len(raw) % 4:
        raise TraceError("page list length is not a multiple of 4")
    a = array("I")
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a


class Trace:
    """Per region, page indexes in first-demand order (each at most once)."""

    def __init__(self) -> None:
        self.order: dict[str, array] = {}
        self._seen: dict[str, bytearray] = {}

    def record(self, region: str, npages: int, pages: list[int]) -> None:
        out = self.order.setdefault(region, array("I"))
        seen = self._seen.get(region)
        if seen is None:  # a loaded trace: what it holds counts as seen
            seen = self._seen[region] = bytearray(max(npages, max(out, default=-1) + 1))
            for p in out:
                seen[p] = 1
        if pages and max(pages) >= len(seen):
            seen.extend(bytes(max(pages) + 1 - len(seen)))
        for p in pages:
            if not seen[p]:
                seen[p] = 1
                out.append(p)

    def __len__(self) -> int:
        return sum(len(a) for a in self.order.values())

    def _doc(self) -> bytes:
        regions = {name: pack_pages(a) for name, a in self.order.items()}
        return msgpack.packb({"regions": regions}, use_bin_type=True)

    def dumps(self) -> bytes:
        return msgfile.dumps(FORMAT, [self._doc()])

    def save(self, path: str, mode: int = 0o600) -> None:
        """Write atomically, never through a symbolic link (raises OSError)."""
        msgfile.write(path, FORMAT, [self._doc()], mode=mode)

    @classmethod
    def loads(cls, data: bytes | bytearray | memoryview) -> "Trace":
        return cls._from_doc(msgfile.loads(FORMAT, data))

    @classmethod
    def _from_doc(cls, doc: dict) -> "Trace":
        regions = doc.get("regions")
        if not isinstance(regions, dict):
            raise TraceError("trace: 'regions' should be a map")
        t = cls()
        for name, raw in regions.items():
            if not isinstance(name, str) or not isinstance(raw, bytes) or len(raw) % 4:
                raise TraceError(f"trace: bad entry for region {name!r}")
            t.order[name] = unpack_pages(raw)
        return t

    def extend_from_meta(self, meta: dict) -> int:
        """Append a page map's hot pages (capture: changed between passes)
        after what the trace already orders; returns how many were added."""
        hot = meta.get("hot")
        if not isinstance(hot, dict):
            return 0
        before = len(self)
        for name, raw in hot.items():
            if isinstance(name, str) and isinstance(raw, bytes) and not len(raw) % 4:
                self.record(name, 0, list(unpack_pages(raw)))
        return len(self) - before

    @classmethod
    def load(cls, path: str) -> "Trace":
        doc = msgfile.load(path, FORMAT)
        try:
            return cls._from_doc(doc)
        except TraceError as e:
            raise TraceError(f"{path}: {e}") from None
