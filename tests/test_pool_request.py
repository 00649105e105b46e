"""``memfs restore DIR --pool SOCK`` before argparse (memfs.pool_request):
what it accepts means exactly what the full parser makes of it, anything
else goes to the full parser, and on that path no command module loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.cli import build_parser
from memfs.pool_request import PoolRequest, parse

TOKENS = st.sampled_from([
    "restore", "/snap", "snap2", "--pool", "/p.sock", "--pool=/q.sock", "--clones", "3",
    "--clones=2", "0", "-1", "x", "--pool-timeout", "2.5", "--pool-timeout=1e1", "nan",
    "-5", "inf", "--mount", "/mnt", "--help", "--debug", "--qmp", "--pool-t", "--", "-", ""])


def test_the_plain_forms() -> None:
    assert parse(["restore", "/s", "--pool", "/p"]) == PoolRequest("/s", "/p", 1, 300.0)
    assert parse(["restore", "--clones=4", "/s", "--pool-timeout", "9", "--pool=/p"]) == \
        PoolRequest("/s", "/p", 4, 9.0)


def test_anything_else_is_left_to_the_full_parser() -> None:
    for argv in (["restore", "/s"], ["restore", "/s", "--pool", "/p", "--mount", "/m"],
                 ["--debug", "restore", "/s", "--pool", "/p"], ["restore", "/s", "--pool"],
                 ["restore", "/s", "--pool", "/p", "--pool", "/q"],
                 ["restore", "/s", "--pool", "/p", "--clones", "two"],
                 ["restore", "/s", "--pool", "/p", "--clones", "0"],
                 ["restore", "/s", "--pool", "/p", "--pool-timeout", "nan"],
                 ["restore", "/s", "--pool", "/p", "--pool-timeout=-1"],
                 ["restore", "/s", "/t", "--pool", "/p"], ["restore", "/s", "--pool-t", "1"],
                 ["restore", "--help"], ["mount", "/s", "--pool", "/p"]):
        assert parse(argv) is None, argv


@settings(max_examples=400, deadline=None)
@given(st.lists(TOKENS, max_size=8))
def test_what_it_accepts_argparse_reads_the_same(tail: list[str]) -> None:
    argv = ["restore", *tail]
    req = parse(argv)
    if req is None:
        return
    a = build_parser().parse_args(argv)
    assert (a.dir, a.pool, a.clones, a.pool_timeout) == \
        (req.snapshot, req.pool, req.clones, req.timeout)
    assert not (a.mount or a.qmp or a.print_args or a.serve)


def test_a_bad_timeout_is_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "memfs", "restore", str(tmp_path), "--pool",
                          str(tmp_path / "p"), "--pool-timeout", "nan"],
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (
        2, "memfs: restore: --pool-timeout nan: not a number of seconds above 0\n")


def test_no_command_module_loads_on_the_way(tmp_path: Path) -> None:
    """Measured by the interpreter itself (-X importtime), on the real
    command: it answers (no pool there) without argparse or memfs.cli."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "memfs", "restore",
                          str(tmp_path), "--pool", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    lines = res.stderr.splitlines()
    loaded = {ln.split("|")[-1].strip() for ln in lines if ln.startswith("import time:")}
    assert "memfs.pool_request" in loaded
    assert not {"argparse", "memfs.cli", "trio", "typing", "dataclasses"} & loaded
    assert (res.returncode, lines[-1]) == (
        1, f"memfs: restore failed: no restore pool listens at {tmp_path}/none (start one "
        "with memfs restore DIR --mount MNT --serve SOCK)")
