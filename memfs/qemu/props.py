"""QEMU's ``key=value,...`` option strings (``-object``, ``-device``, ``-nic``).

Why: a clone's command line is the source's with a few properties changed;
every other property, including values with ``,,`` for a comma, must come
through unchanged.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["parse_props", "join_props"]


def parse_props(arg: str) -> list[tuple[str, str]]:
    """``a=b,c=d`` (with ``,,`` for a comma) as pairs; a bare first word is
    ("", word) — the driver or qom-type."""
    parts, cur, i = [], "", 0
    while i < len(arg):
        if arg[i] == ",":
            if arg[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += arg[i]
        i += 1
    parts.append(cur)
    out = []
    for p in parts:
        k, eq, v = p.partition("=")
        out.append((k, v) if eq else ("", k))
    return out


def join_props(props: Sequence[tuple[str, str]]) -> str:
    return ",".join(v.replace(",", ",,") if not k else f"{k}={v.replace(',', ',,')}"
                    for k, v in props)
