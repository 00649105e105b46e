"""Working-set traces: the order in which pages were first demanded.

A later mount of the same image fetches these pages first (the REAP and
FaaSnap idea): a guest that resumes tends to touch what it touched before.
Stored as msgpack with packed uint32 page arrays, validated like page maps.
"""

from __future__ import annotations

import os
import sys
from array import array

import msgpack

MAGIC = "memfs-trace"
VERSION = 1
MAX_ENTRIES = 1 << 32


class TraceError(Exception):
    """A trace file is unreadable or malformed."""


class Trace:
    """Per region, page indexes in first-demand order (each at most once)."""

    def __init__(self) -> None:
        self.order: dict[str, array] = {}
        self._seen: dict[str, bytearray] = {}

    def record(self, region: str, npages: int, pages: list[int]) -> None:
        seen = self._seen.get(region)
        if seen is None:
            seen = self._seen[region] = bytearray(npages)
            self.order[region] = array("I")
        out = self.order[region]
        for p in pages:
            if not seen[p]:
                seen[p] = 1
                out.append(p)

    def __len__(self) -> int:
        return sum(len(a) for a in self.order.values())

    def dumps(self) -> bytes:
        regions = {}
        for name, a in self.order.items():
            b = array("I", a)
            if b.itemsize != 4:
                raise TraceError("this platform has no 4-byte unsigned int array")
            if sys.byteorder != "little":
                b.byteswap()
            regions[name] = b.tobytes()
        return msgpack.packb({"magic": MAGIC, "version": VERSION, "regions": regions},
                             use_bin_type=True)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self.dumps())
        os.replace(tmp, path)

    @classmethod
    def loads(cls, data: bytes) -> "Trace":
        try:
            doc = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise TraceError(f"not a trace: {e}") from None
        if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
            raise TraceError("not a trace (bad magic)")
        if doc.get("version") != VERSION:
            raise TraceError(f"unsupported trace version {doc.get('version')!r}")
        regions = doc.get("regions")
        if not isinstance(regions, dict):
            raise TraceError("trace: 'regions' should be a map")
        t = cls()
        for name, raw in regions.items():
            if not isinstance(name, str) or not isinstance(raw, bytes) or len(raw) % 4:
                raise TraceError(f"trace: bad entry for region {name!r}")
            a = array("I")
            a.frombytes(raw)
            if sys.byteorder != "little":
                a.byteswap()
            t.order[name] = a
        return t

    @classmethod
    def load(cls, path: str) -> "Trace":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
        return cls.loads(data)
