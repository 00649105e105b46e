"""Fixtures shared by the test modules (helpers live in ramimage.py, nbdserver.py)."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from daemonlog import (daemon_log_check, expect_log, pytest_configure,  # noqa: E402,F401
                       pytest_runtest_makereport)
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


@pytest.fixture(scope="module")
def guest():
    """The test guest (tools/mkguest), built once; skipped without QEMU."""
    from memfs.qemu import qemu_binary
    from memfs.qemu.guest import build_guest
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return build_guest()


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[object]:
    """One real single-host Ceph cluster (tests/ceph.py) for the whole session,
    started on first use; skipped, with the reason, where Ceph cannot run."""
    import ceph
    why = ceph.missing()
    if why:
        pytest.skip(why)
    with ceph.ceph_cluster() as cluster:
        yield cluster


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory in /dev/shm for guest RAM files, removed afterwards."""
    d = Path("/dev/shm") / f"memfs-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
