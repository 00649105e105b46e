"""The disk interface and URI parsing shared by all back ends."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import trio


class DiskError(Exception):
    """A disk could not be opened, read or written; the message says which and why."""


@dataclass(frozen=True)
class DiskURI:
    """A parsed disk URI.  ``scheme`` is ``file``, ``nbd``, ``nbd+unix`` or ``rbd``."""

    uri: str
    scheme: str
    path: str = ""          # file path
    host: str = ""          # nbd TCP host
    port: int = 10809       # nbd TCP port
    export: str = ""        # nbd export name
    socket: str = ""        # nbd+unix socket path
    pool: str = ""          # rbd pool
    namespace: str = ""     # rbd namespace (may be empty)
    image: str = ""         # rbd image
    snap: str = ""          # rbd snapshot (a frozen, read-only view)
    query: dict[str, str] = field(default_factory=dict)


#: the query options each scheme understands (a misspelt one is refused, not ignored)
QUERY_OPTIONS = {"file": (), "nbd": ("timeout", "connections", "retries"),
                 "nbd+unix": ("socket", "timeout", "connections", "retries")}


def parse_uri(uri: str) -> DiskURI:
    """Parse a disk name: a plain path, file://, nbd://, nbd+unix:// or rbd:."""
    if uri.startswith("rbd:"):
        from .rbd import parse_rbd
        return parse_rbd(uri)
    if "://" not in uri:
        if not uri:
            raise DiskError("empty disk name")
        if "\0" in uri:
            raise DiskError(f"{uri!r}: a path cannot hold a NUL byte")
        return DiskURI(uri, "file", path=os.path.abspath(uri))
    try:
        u = urlsplit(uri)
        query = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    except ValueError as e:
        raise DiskError(f"{uri}: not a valid URI: {e}") from None
    known = QUERY_OPTIONS.get(u.scheme)
    if known is not None:
        unknown = sorted(set(query) - set(known))
        if unknown:
            raise DiskError(f"{uri}: unknown option {unknown[0]!r} for {u.scheme}:// "
                            f"(known: {', '.join(known) or 'none'})")
    if u.scheme == "file":
        if u.netloc not in ("", "localhost"):
            raise DiskError(f"{uri}: file URIs name a local path (file:///path)")
        path = unquote(u.path)
        if not path or "\0" in path:
            raise DiskError(f"{uri}: file URIs name a local path (file:///path)")
        return DiskURI(uri, "file", path=path)
    export = unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if u.scheme == "nbd":
        if not u.hostname:
            raise DiskError(f"{uri}: nbd:// needs a host")
        try:
            port = u.port or 10809
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise DiskError(f"{uri}: bad port") from None
        return DiskURI(uri, "nbd", host=u.hostname, port=port, export=export, query=query)
    if u.scheme == "nbd+unix":
        sock = query.get("socket", "")
        if not sock:
            raise DiskError(f"{uri}: nbd+unix:// needs ?socket=PATH")
        return DiskURI(uri, "nbd+unix", export=export, socket=sock, query=query)
    raise DiskError(f"{uri}: unsupported disk scheme {u.scheme!r} "
                    "(use a path, file://, nbd:// or nbd+unix://)")


class Disk(abc.ABC):
    """A random-access byte range store.  All methods are trio-async."""

    uri: str
    size: int
    #: seconds a whole read may take, retries included (None: no deadline)
    timeout: float | None = None
    #: the largest single request worth issuing; callers split larger ones
    max_request: int = 32 << 20

    @abc.abstractmethod
    async def read(self, offset: int, length: int, *, deadline: float | None = None) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or DiskError.

        ``deadline`` (trio clock) ends the read, retries included, earlier
        than the disk's own timeout would: a caller's retries share it.
        """

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        raise DiskError(f"{self.uri}: opened read-only")

    async def write_many(self, items: list[tuple[int, bytes | memoryview]]) -> None:
        """Several writes, in flight together (the sync copies runs of dirty
        pages in batches); all done, or the first DiskError."""
        limit = trio.CapacityLimiter(16)

        async def one(offset: int, data: bytes | memoryview) -> None:
            async with limit:
                await self.write(offset, data)
        async with trio.open_nursery() as nursery:
            for offset, data in items:
                nursery.start_soon(one, offset, data)

    async def flush(self) -> None:
        """Make every completed write durable."""

    async def drop_cache(self) -> None:
        """Drop what the host page cache holds of this disk (a local file): the
        mount's region keeps guest RAM once, not a second time here."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the disk; further calls fail."""

    def stats(self) -> dict[str, int]:
        """Back-end counters (reconnects, retries, …) for the stats files."""
        return {}

    async def __aenter__(self) -> "Disk":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
