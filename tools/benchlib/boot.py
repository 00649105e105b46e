"""Start a benchmark script in the repository's venv with memfs importable.

Why: the scripts are run as ``tools/bench-X`` with whatever python3 is on
PATH; memfs and its dependencies live in the repository's .venv.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def enter(script: str, tests: bool = False) -> None:
    """Re-exec ``script`` with the venv's python if this is another one; put
    the repository (and with ``tests`` its tests/ helpers) on the import path."""
    venv = REPO / ".venv"
    py = venv / "bin" / "python"
    if py.exists() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(str(py), [str(py), os.path.abspath(script), *sys.argv[1:]])
    sys.path.insert(0, str(REPO))
    if tests:
        sys.path.insert(0, str(REPO / "tests"))
