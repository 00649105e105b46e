"""Fixtures shared by the test modules (helpers live in ramimage.py, nbdserver.py)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from ramimage import make_ram  # noqa: E402


def pytest_report_header(config: pytest.Config) -> list[str]:
    tools = ("fusermount3", "qemu-nbd", "nbdkit", "nbdcopy", "qemu-system-x86_64")
    return ["tools: " + ", ".join(f"{t}={'yes' if shutil.which(t) else 'MISSING'}"
                                  for t in tools)]


@pytest.fixture
def needs_fuse() -> None:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0 or not shutil.which("fusermount3"):
        pytest.skip("needs root, /dev/fuse and fusermount3")


@pytest.fixture
def ram(tmp_path) -> tuple[str, bytes]:
    """A 4 MiB RAM image (1024 pages) and its bytes."""
    path = str(tmp_path / "vm.ram")
    return path, make_ram(path, 1024)
