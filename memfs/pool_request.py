"""``memfs restore DIR --pool SOCK``: ask a restore pool for clones.

This process is on the path to the clones' first tick, so it imports the
standard library alone (socket, json) and, started as the ``memfs`` command,
is recognised before argparse and the command modules load
(``memfs.__main__``): 20-30 ms of a 0.25 s restore.  Any other spelling of
the command (``--help``, an option it does not know, a value that does not
parse) goes through the full parser, which says what is wrong.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

TYPE_CHECKING = False   # no typing (nor dataclasses) at run time: ~12 ms of imports
if TYPE_CHECKING:
    from typing import Any, Sequence

__all__ = ["PoolRequest", "parse", "usable_timeout", "ask"]


class PoolRequest:
    """What to ask which pool for."""

    def __init__(self, snapshot: str, pool: str, clones: int = 1,
                 timeout: float = 300.0) -> None:
        self.snapshot, self.pool, self.clones, self.timeout = snapshot, pool, clones, timeout

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolRequest) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"PoolRequest({self.snapshot!r}, {self.pool!r}, {self.clones}, {self.timeout})"


_VALUES = {"--pool": str, "--clones": int, "--pool-timeout": float}


def parse(argv: Sequence[str]) -> PoolRequest | None:
    """``restore DIR --pool SOCK [--clones N] [--pool-timeout S]`` (each
    option once, ``--opt V`` or ``--opt=V``), else None: then the full parser
    decides, so an accepted spelling means exactly what argparse makes of it."""
    if len(argv) < 2 or argv[0] != "restore":
        return None
    positional: list[str] = []
    got: dict[str, Any] = {}
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("-"):
            positional.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name not in _VALUES or name in got:
            return None
        if not eq:
            if not rest or rest[0].startswith("-"):
                return None
            value = rest.pop(0)
        try:
            got[name] = _VALUES[name](value)
        except ValueError:
            return None
    timeout = got.get("--pool-timeout", 300.0)
    if len(positional) != 1 or "--pool" not in got or got.get("--clones", 1) < 1 \
            or not usable_timeout(timeout):
        return None
    return PoolRequest(positional[0], got["--pool"], got.get("--clones", 1), timeout)


def usable_timeout(seconds: float) -> bool:
    """A socket timeout: above 0 and finite (nan and inf are not)."""
    return 0 < seconds < float("inf")


def ask(req: PoolRequest, started: float) -> int:
    """Send the request, print the pool's JSON answer (with the command's
    ``start`` and ``seconds``); a refusal is one line on stderr, status 1."""
    line = json.dumps({"snapshot": os.path.abspath(req.snapshot), "clones": req.clones})
    data = b""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(req.timeout)
            s.connect(req.pool)
            s.sendall(line.encode() + b"\n")
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        return _failed(f"no restore pool listens at {req.pool} (start one with "
                       "memfs restore DIR --mount MNT --serve SOCK)")
    except OSError as e:
        return _failed(f"restore pool {req.pool}: {e.strerror or e}")
    try:
        rep = json.loads(data)
    except ValueError:
        rep = {"error": f"the pool at {req.pool} answered {data[:80]!r}"}
    if "error" in rep:
        return _failed(str(rep["error"]))
    rep["t"]["start"] = started
    rep["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(rep, indent=1))
    return 0


def _failed(why: str) -> int:
    print(f"memfs: restore failed: {why}", file=sys.stderr)
    return 1
