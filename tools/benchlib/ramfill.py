"""RAM images of the benchmarks' page mix: a quarter zero pages, an eighth
one repeated page, the rest random (what capture's zero and duplicate
detection meet in a real guest, in round numbers)."""

from __future__ import annotations

import os
import random

PS = 4096
MIB = 1 << 20


def mixed_mib(rep: bytes) -> bytes:
    """One MiB of the mix; ``rep`` is the repeated page."""
    rnd = os.urandom(160 * PS)
    pages, j = [], 0
    for i in range(256):
        k = i % 8
        if k in (0, 4):
            pages.append(bytes(PS))
        elif k == 6:
            pages.append(rep)
        else:
            pages.append(rnd[j * PS:(j + 1) * PS])
            j += 1
    return b"".join(pages)


def make_ram(path: str, size: int, seed: int) -> None:
    """``size`` bytes of the mix at ``path``, written a MiB at a time; the
    repeated page comes from ``seed``."""
    rep = random.Random(seed).randbytes(PS)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(mixed_mib(rep))
