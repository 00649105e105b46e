"""Results as an aligned text table and as JSON (a file, or stdout for '-')."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIB = 1 << 20


def cell(v: Any, fmt: str) -> str:
    """One value: "-" when missing, bytes as MiB for "mib", else ``fmt``."""
    if v is None:
        return "-"
    if fmt == "mib":
        return f"{v / MIB:.1f}"
    return fmt.format(v)


def table(results: list[dict[str, Any]], columns: list[tuple[str, str, str]],
          name: str = "method") -> str:
    """A row per result (``columns``: key, title, format), then each row's error."""
    rows = [[title for _, title, _ in columns]]
    notes = []
    for r in results:
        rows.append([cell(r.get(key), fmt) for key, _, fmt in columns])
        if r.get("error"):
            notes.append(f"{r[name]}: {r['error']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines + notes)


def write_json(doc: Any, where: Path | None, indent: int = 2) -> None:
    """``doc`` as JSON to ``where`` ('-': stdout); nothing when None."""
    if where is None:
        return
    text = json.dumps(doc, indent=indent, default=str)
    if str(where) == "-":
        print(text)
    else:
        where.write_text(text + "\n")
