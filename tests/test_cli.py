"""The ``memfs`` command as a package: every way to start it, and ``main()``
twice in one process (it used to register sub-commands process-wide and fail
the second time with ``conflicting subparser: index``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def test_main_twice_in_one_process(tmp_path: Path) -> None:
    """Run in a child: main() sets up the root logger once per process."""
    code = ("import sys\n"
            "from memfs.cli import main\n"
            f"a = main(['stats', {str(tmp_path)!r}])\n"
            f"b = main(['index', {str(tmp_path / 'no-disk')!r}, '--out', "
            f"{str(tmp_path / 'idx')!r}])\n"
            f"c = main(['stats', {str(tmp_path)!r}])\n"
            "print(a, b, c)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout == "1 1 1\n"
    stats_err = f"memfs: cannot read stats of {tmp_path}: No such file or directory\n"
    assert res.stderr == (stats_err + f"memfs: cannot open disk: {tmp_path}/no-disk: cannot "
                          "open: No such file or directory\n" + stats_err)


@pytest.mark.parametrize("argv", [[sys.executable, "-m", "memfs"],
                                  [sys.executable, "-m", "memfs.cli"],
                                  [str(VENV_BIN / "memfs")]],
                         ids=["python -m memfs", "python -m memfs.cli", "console script"])
def test_every_way_to_start_it(argv: list[str]) -> None:
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]}: not installed (pip install -e .)")
    res = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (0, "memfs 0.1.0\n")
    res = subprocess.run([*argv, "umount"], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (
        2, "memfs: the following arguments are required: mountpoint (see memfs umount --help)\n")


def test_help_lists_every_command() -> None:
    res = subprocess.run([sys.executable, "-m", "memfs", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    assert "{capture,mount,load,save,umount,stats,index,migrate,snapshot,restore}" in res.stdout


def test_restore_option_errors_are_usage_errors(tmp_path: Path) -> None:
    """A value that does not parse is a usage error (status 2) before the
    snapshot is even looked at, as for every other command."""
    res = subprocess.run([sys.executable, "-m", "memfs", "restore", str(tmp_path), "--mount",
                          str(tmp_path / "mnt"), "--prefetch-rate", "12Q"],
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (2, "memfs: --prefetch-rate 12Q: bad size '12Q'\n")
    res = subprocess.run([sys.executable, "-m", "memfs", "restore", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (
        2, "memfs: restore: --mount MNT is needed (or --pool SOCK)\n")
    res = subprocess.run([sys.executable, "-m", "memfs", "restore", str(tmp_path), "--pool",
                          str(tmp_path / "p"), "--mount", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (
        2, "memfs: restore: --pool takes no --mount, --qmp, --print-args or --serve (the "
        "pool has its mount and its QEMUs)\n")
    res = subprocess.run([sys.executable, "-m", "memfs", "restore", str(tmp_path), "--mount",
                          str(tmp_path / "m"), "--serve", str(tmp_path / "s"), "--qmp",
                          str(tmp_path / "q")], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (
        2, "memfs: restore: --qmp and --serve exclude each other (--qmp drives QEMUs already "
        "started, --print-args starts none, --serve starts its own)\n")
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()


def test_the_cli_imports_no_layer_until_a_command_runs() -> None:
    """``import memfs.cli`` stays cheap: ``memfs restore --pool`` and
    ``memfs stats`` are on paths where an interpreter's start counts."""
    code = ("import sys, memfs.cli\n"
            "heavy = ('trio', 'pyfuse3', 'memfs.daemon', 'memfs.qemu', 'memfs.capture',\n"
            "         'memfs.pagemap', 'memfs.control')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout == "[]\n", res.stderr
