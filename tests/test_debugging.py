"""Seeing inside a running daemon: SIGUSR1 dumps every thread's stack to its log."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ramimage import mounted

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("needs_fuse")]


def test_sigusr1_dumps_stacks_to_the_log(tmp_path) -> None:
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "memfs.log")
    with mounted(None, mnt, "--region", "ram0:4M", log=log):
        with open(os.path.join(mnt, ".memfs", "pid")) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "most recent call first" not in open(log).read():
            assert time.monotonic() < deadline, open(log).read()[-2000:]
            time.sleep(0.05)
        text = open(log).read()
        assert "Thread 0x" in text and "trio" in text  # every thread, the loop's frames
        # and the daemon goes on serving
        with open(os.path.join(mnt, ".memfs", "pages_total")) as f:
            assert int(f.read()) == 1024
