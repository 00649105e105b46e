"""What capture shares with the code around it: its error, the Referencer
protocol it asks a referenced disk through, its result and the RAM argument
parser.

Apart from the capture engine (memfs.capture) so that the disk referencer
(memfs.index.referencer), the QEMU passes and the CLI can name them without
importing capture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence


class CaptureError(Exception):
    """Capture could not run; the message says why."""


class Referencer(Protocol):
    """Finds a page's content on a disk the page map may refer to (issue 6)."""

    disk_uri: str

    async def find(self, csum: int, page: bytes) -> int | None:
        """Byte offset on ``disk_uri`` holding exactly ``page``, or None."""


@dataclass
class CaptureResult:
    pages_total: int = 0
    pages_zero: int = 0
    pages_written: int = 0
    pages_unchanged: int = 0
    pages_referenced: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    volume: str = ""
    pagemap: str = ""
    regions: dict[str, int] = field(default_factory=dict)
    #: pages written by this pass that a base pass had with other content
    hot_pages: int = 0
    #: region -> pages rewritten since the base pass (the prefetcher takes them first)
    hot: dict[str, list[int]] = field(default_factory=dict, repr=False)
    #: pages not read: still remote in the mount view, they keep their location
    pages_kept: int = 0
    #: pages read from the RAM files
    pages_read: int = 0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("hot")
        return d


def parse_ram_args(rams: Sequence[str]) -> list[tuple[str, str]]:
    """``[NAME=]PATH`` arguments -> (region name, path); names default to ramN."""
    out = []
    for i, arg in enumerate(rams):
        name, sep, path = arg.partition("=")
        if not sep or "/" in name:
            name, path = f"ram{i}", arg
        out.append((name, path))
    return out
