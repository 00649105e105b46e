"""memfs.mounttable: the one reader of /proc/self/mountinfo."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, strategies as st

from memfs.mounttable import find_mount, lexical, mount_table, mounts_at, parse_line


def _escape(path: str) -> str:
    """As the kernel writes a path into mountinfo (show_mountinfo: mangle)."""
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011") \
        .replace("\n", "\\012")


@given(path=st.text(alphabet=st.sampled_from("ab/ \t\n\\-x"), min_size=1).map(lambda p: "/" + p),
       major=st.integers(0, 4095), minor=st.integers(0, 1 << 20),
       tags=st.lists(st.sampled_from(["shared:1", "master:7", "unbindable"]), max_size=3),
       fstype=st.sampled_from(["fuse.memfs", "ext4", "tmpfs"]))
def test_parse_line_roundtrip(path: str, major: int, minor: int, tags: list[str],
                              fstype: str) -> None:
    line = (f"36 25 {major}:{minor} / {_escape(path)} rw,relatime {' '.join(tags)} - "
            f"{fstype} src rw\n").replace("  ", " ")
    e = parse_line(line)
    assert (e.mountpoint, e.major, e.minor, e.fstype) == (path, major, minor, fstype)
    assert e.dev == f"{major}:{minor}"
    assert e.is_memfs == (fstype == "fuse.memfs")


def test_the_real_table() -> None:
    """/proc is mounted here; the table's last entry at a path is on top."""
    table = mount_table()
    assert any(e.mountpoint == "/proc" and e.fstype == "proc" for e in table)
    top = find_mount("/proc")
    assert top is not None and top == mounts_at("/proc")[-1] and top.fstype == "proc"
    assert find_mount("/proc/self") is None  # inside a mount, not a mount point


def test_lexical_does_not_resolve_the_last_name(tmp_path) -> None:
    os.symlink("/proc", tmp_path / "link")
    assert lexical(tmp_path / "link") == os.path.join(os.path.realpath(tmp_path), "link")
    assert find_mount(tmp_path / "link") is None


def test_one_reader_of_the_mount_table() -> None:
    """memfs, its tests and its tools read /proc/self/mountinfo only through
    memfs.mounttable (issue 13: there were four parsers)."""
    root = Path(__file__).resolve().parents[1]
    readers = [str(p.relative_to(root)) for d in ("memfs", "tests", "tools")
               for p in sorted((root / d).rglob("*")) if p.is_file()
               and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")
               and "/proc/self/" + "mountinfo" in p.read_text(errors="replace")]
    assert readers == ["memfs/mounttable.py", "tests/test_mounttable.py"]
