"""What an operator does to a mount, with real mounts: umount at any moment,
signals, dead daemons, who may command a mount, where it may write, and one
clear line for every mistake on the command line."""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from memfs import control
from memfs.control import ControlError, parse_line
from memfs.mounttable import find_mount
from ramimage import PS, is_mounted, make_ram, memfs, mounted

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("needs_fuse")]

BIG_PAGES = 16384  # 64 MiB: a prefetch that runs for seconds at --prefetch-rate 4M


# -- helpers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[str, bytes]:
    """A captured 64 MiB RAM image: (page map, bytes)."""
    d = tmp_path_factory.mktemp("big")
    data = make_ram(str(d / "ram"), BIG_PAGES)
    memfs("capture", "--ram", str(d / "ram"), "--volume", str(d / "vol"), "--out",
          str(d / "pm"), "--no-progress")
    return str(d / "pm"), data


@pytest.fixture
def small(tmp_path, ram) -> tuple[str, bytes]:
    path, data = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    return pm, data


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory that every user may enter (tmp_path is root's 0700)."""
    d = tempfile.mkdtemp(prefix="memfs-op-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", d])


def alive(pid: int) -> bool:
    """Running: an exited daemon waits as a zombie until init reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def daemon(mnt: str, pm: str | None, *args: str, log: str) -> Iterator[int]:
    """``memfs mount`` as an operator runs it (daemonized); yields the pid and
    always cleans up."""
    os.makedirs(mnt, exist_ok=True)
    res = memfs("mount", *([pm] if pm else []), mnt, *args, "--log", log)
    pid = int(re.search(r"\(pid (\d+),", res.stdout)[1])
    try:
        yield pid
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        if is_mounted(mnt):
            memfs("umount", "--force", mnt, check=False)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)


def umount(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    res = memfs("umount", *args, check=False)
    took = time.monotonic() - t
    print(f"\n[timing] memfs umount {' '.join(args)}: {took:.3f}s rc={res.returncode} "
          f"{(res.stdout + res.stderr).strip()}")
    return res, took


def wait_for(what, timeout: float = 60.0) -> None:
    """Poll until ``what()`` holds (a safety net for a hang, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def log_text(path: str) -> str:
    with open(path) as f:
        return f.read()


MAPPER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
print("ready", flush=True)
for line in sys.stdin:
    p = int(line)
    sys.stdout.write(m[p * 4096:(p + 1) * 4096].hex() + "\n")
    sys.stdout.flush()
"""


@contextmanager
def mapper(path: str) -> Iterator[subprocess.Popen]:
    """A process that maps a region and reads pages from it on request (a
    thread of ours touching a FUSE mapping would hold the GIL)."""
    proc = subprocess.Popen([sys.executable, "-c", MAPPER, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def page_via(proc: subprocess.Popen, p: int) -> bytes:
    proc.stdin.write(f"{p}\n")
    proc.stdin.flush()
    return bytes.fromhex(proc.stdout.readline().strip())


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def gone(mnt: str, pid: int) -> bool:
    return not is_mounted(mnt) and not alive(pid)


# -- umount --------------------------------------------------------------------------

def test_umount_right_after_mount_stops_the_prefetch(big, tmp_path) -> None:
    pm, _ = big
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "log")
    with daemon(mnt, pm, "--prefetch-rate", "4M", log=log) as pid:
        res, _ = umount(mnt)
        assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
        assert gone(mnt, pid)
    text = log_text(log)
    assert "stop: stopping the prefetch and unmounting" in text
    assert "every page is local" not in text  # it was still running
    assert "BUG" not in text and "Traceback" not in text


def test_umount_right_after_load_stops_the_prefetch(big, tmp_path) -> None:
    pm, _ = big
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "log")
    with daemon(mnt, None, "--region", f"ram0:{BIG_PAGES * PS}", "--prefetch-rate", "4M",
                log=log) as pid:
        memfs("load", mnt, pm)
        assert control.read_stats(mnt)["prefetch_done"] == 0
        res, _ = umount(mnt)
        assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
        assert gone(mnt, pid)
    assert "every page is local" not in log_text(log)


def test_umount_stops_a_mount_waiting_for_its_page_map(tmp_path) -> None:
    """A reader waits for the page map that never comes; umount ends both."""
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "log")
    with daemon(mnt, None, "--region", "ram0:4M", log=log) as pid:
        reader = subprocess.Popen(["dd", f"if={mnt}/ram0", "of=/dev/null", "bs=4k",
                                   "count=1"], stderr=subprocess.PIPE, text=True)
        wait_for(lambda: "waits for the page map" in log_text(log))
        res, _ = umount(mnt)
        assert (res.returncode, res.stderr) == (0, "")
        assert gone(mnt, pid)
        _, err = reader.communicate(timeout=60)
    print(f"\n[reader] {err.strip()}")
    assert reader.returncode == 1
    # the kernel ends a request of a connection that went away with ENOTCONN
    # or, when it was aborted under the request, ECONNABORTED
    assert re.search(rf"dd: error reading '{re.escape(mnt)}/ram0': (Transport endpoint is "
                     rf"not connected|Software caused connection abort)\n", err), err


def test_umount_cleans_up_after_a_killed_daemon(small, tmp_path) -> None:
    pm, _ = small
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "log")
    with daemon(mnt, pm, log=log) as pid:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid))
        assert is_mounted(mnt)
        res, _ = umount(mnt)
        assert (res.returncode, res.stderr) == (0, "")
        # A daemon killed while its prefetcher had a region file of its own
        # mount open cannot finish exiting (that close waits for write-back
        # nobody answers), so its connection may still look open: then umount
        # aborts it.  Either way one line says what it did, and it is gone.
        assert re.fullmatch(
            rf"memfs: the daemon of {re.escape(mnt)} (is gone \(its FUSE connection is "
            rf"closed\):|does not answer \(not in 5s\): aborted FUSE connection \d+ and) "
            rf"detached {re.escape(mnt)}\n", res.stdout), res.stdout
        assert not is_mounted(mnt)


def test_umount_aborts_a_daemon_that_does_not_answer(small, tmp_path) -> None:
    """A stopped daemon holds its connection: requests wait forever.  umount
    aborts the connection through fusectl and detaches the mount."""
    pm, _ = small
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "log")
    with daemon(mnt, pm, "--no-prefetch", log=log) as pid:
        entry = find_mount(mnt)
        assert entry is not None and entry.fstype == "fuse.memfs"
        os.kill(pid, signal.SIGSTOP)
        try:
            res, _ = umount(mnt)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (res.returncode, res.stderr) == (0, "")
        assert res.stdout == (f"memfs: the daemon of {mnt} does not answer (not in 5s): "
                              f"aborted FUSE connection {entry.minor} and detached {mnt}\n")
        assert not is_mounted(mnt)
        wait_for(lambda: not alive(pid))  # it finds its connection aborted and ends


def test_umount_refuses_while_a_region_is_mapped_then_force(small, tmp_path) -> None:
    pm, data = small
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "log")
    with daemon(mnt, pm, "--no-prefetch", log=log) as pid:
        with mapper(f"{mnt}/ram0") as m:
            assert page_via(m, 1) == data[PS:2 * PS]
            res, _ = umount(mnt)
            assert (res.returncode, res.stdout) == (1, "")
            assert res.stderr == (f"memfs: not unmounting {mnt}: ram0 is mapped by pid "
                                  f"{m.pid} ({comm(m.pid)}) (stop it first, or --force)\n")
            assert is_mounted(mnt) and alive(pid)
            assert page_via(m, 2) == data[2 * PS:3 * PS]  # still served
            # the daemon refuses the same on its own (a stop sent by hand)
            with pytest.raises(ControlError, match=rf"ram0 is mapped by pid {m.pid} "):
                control.stop(mnt)
            res, _ = umount("--force", mnt)
            assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
            assert gone(mnt, pid)
    assert "stop force: stopping the prefetch and unmounting" in log_text(log)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_while_mapped_keeps_serving(small, tmp_path, sig) -> None:
    pm, data = small
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "log")
    with daemon(mnt, pm, "--no-prefetch", log=log) as pid:
        with mapper(f"{mnt}/ram0") as m:
            assert page_via(m, 1) == data[PS:2 * PS]
            t = time.monotonic()
            os.kill(pid, sig)
            line = (f"{sig.name}: not unmounting {mnt}: ram0 is mapped by pid {m.pid} "
                    f"({comm(m.pid)}); still serving")
            wait_for(lambda: line in log_text(log))
            print(f"\n[timing] {sig.name} while mapped: logged after {time.monotonic() - t:.3f}s")
            for p in (9, 700, 1023):  # pages never touched before: READs after the signal
                assert page_via(m, p) == data[p * PS:(p + 1) * PS]
            assert is_mounted(mnt) and alive(pid)
        t = time.monotonic()
        os.kill(pid, sig)  # nothing maps it now
        wait_for(lambda: gone(mnt, pid))
        print(f"\n[timing] {sig.name} unmapped: unmounted and exited after "
              f"{time.monotonic() - t:.3f}s")
    assert f"{sig.name}: stopping the prefetch and unmounting {mnt}" in log_text(log)


def test_sigint_in_the_foreground_unmounts(small, tmp_path) -> None:
    pm, _ = small
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt) as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not is_mounted(mnt)


# -- who may command a mount, where it may write ---------------------------------------

def run_as(uid: int, fn) -> tuple[int, str]:
    """``fn()`` in a forked child under ``uid``: (its return value, its stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(r)
            os.dup2(w, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)  # not pytest's capture
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = fn()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


NOBODY = 65534


def test_control_refused_to_another_uid(small, open_dir) -> None:
    pm, _ = small
    mnt = os.path.join(open_dir, "mnt")
    with mounted(pm, mnt, "--allow-other", "--mode", "644"):
        def open_control() -> int:
            try:
                os.open(f"{mnt}/.memfs/control", os.O_WRONLY)
            except OSError as e:
                return e.errno
            return 0

        code, _ = run_as(NOBODY, open_control)
        assert code == errno.EACCES
        # the stats stay readable, and the region as --mode says
        code, _ = run_as(NOBODY, lambda: len(open(f"{mnt}/ram0", "rb").read(PS)) == PS)
        assert code == 1

        from memfs.cli import main
        code, err = run_as(NOBODY, lambda: main(["save", mnt, f"{open_dir}/view"]))
        assert (code, err) == (1, f"memfs: {mnt}/.memfs/control: Permission denied\n")
        assert not os.path.exists(f"{open_dir}/view")


@pytest.mark.expect_log("control command failed: ")
def test_save_only_where_allowed(small, tmp_path, open_dir) -> None:
    pm, _ = small
    mnt = str(tmp_path / "mnt")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "link")
    os.symlink(tmp_path, os.path.join(open_dir, "dirlink"))
    user_dir = os.path.join(open_dir, "user")  # a directory another user controls
    os.mkdir(user_dir)
    os.chown(user_dir, NOBODY, NOBODY)
    allowed = str(tmp_path)
    with mounted(pm, mnt):
        ok = memfs("save", mnt, str(tmp_path / "view"))
        assert ok.returncode == 0 and os.path.getsize(tmp_path / "view") > 0
        cases = {
            f"{user_dir}/view": (f"refused: this mount writes only under {allowed} or in a "
                                 f"directory only root or its owner can write, not in "
                                 f"{user_dir} (mount option --control-dir DIR)"),
            "/tmp/memfs-op-view": (f"refused: this mount writes only under {allowed} or in a "
                                   f"directory only root or its owner can write, not in /tmp "
                                   f"(mount option --control-dir DIR)"),
            str(tmp_path / "link"): f"refused: {tmp_path}/link is a symbolic link",
            f"{open_dir}/dirlink/view2": (f"refused: {open_dir}/dirlink is a symbolic link "
                                          f"(memfs writes only through real directories)"),
        }
        for path, why in cases.items():
            res = memfs("save", mnt, path, check=False)
            assert (res.returncode, res.stdout) == (1, ""), path
            assert res.stderr == f"memfs: save {path}: {why}\n"
            with open(f"{mnt}/.memfs/last_error") as f:
                assert f.read() == f"save {path}: {why}\n"
        assert victim.read_text() == "keep me"
        assert not os.path.exists(tmp_path / "view2")
        assert not os.path.exists("/tmp/memfs-op-view")


@pytest.mark.expect_log("control command failed: ")
def test_control_dir_is_the_only_place(small, tmp_path) -> None:
    pm, _ = small
    mnt, out = str(tmp_path / "mnt"), tmp_path / "out"
    out.mkdir()
    with mounted(pm, mnt, "--control-dir", str(out)):
        assert memfs("save", mnt, str(out / "view")).returncode == 0
        with pytest.raises(ControlError) as e:
            control.send(mnt, f"trace {tmp_path}/t")
        assert str(e.value) == (f"trace {tmp_path}/t: refused: this mount writes only under "
                                f"{out}, not in {tmp_path} (mount option --control-dir DIR)")
        assert not os.path.exists(tmp_path / "t")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_line_refuses_cleanly(line: str) -> None:
    try:
        cmd, arg = parse_line(line)
    except ControlError as e:
        assert "\n" not in str(e)
        return
    assert cmd in control.COMMANDS
    if control.COMMANDS[cmd] == "PATH":
        assert os.path.isabs(arg) and arg.isprintable()


@pytest.mark.expect_log("control command failed: ")
def test_control_file_fuzz_never_hurts_the_daemon(small, tmp_path) -> None:
    pm, data = small
    mnt, log = str(tmp_path / "mnt"), str(tmp_path / "log")
    known = tuple(w.encode() for w in control.COMMANDS)

    with mounted(pm, mnt, "--no-prefetch", log=log) as proc:
        @settings(max_examples=150, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.binary(min_size=1, max_size=300))
        def one(payload: bytes) -> None:
            lines = [ln.strip() for ln in payload.decode(errors="replace").splitlines()]
            if any(ln.split(" ")[0].encode() in known for ln in lines if ln):
                return  # a real command: not what this test is about
            fd = os.open(f"{mnt}/.memfs/control", os.O_WRONLY)
            try:
                os.write(fd, payload)
            except OSError as e:
                assert e.errno == errno.EINVAL
                with open(f"{mnt}/.memfs/last_error") as f:
                    why = f.read()
                assert why.endswith("\n") and "\n" not in why[:-1] and why.isprintable() \
                    or why[:-1].isprintable()
            else:
                assert not any(lines), payload
            finally:
                os.close(fd)

        one()
        assert proc.poll() is None
        with open(f"{mnt}/ram0", "rb") as f:
            assert f.read(4 * PS) == data[:4 * PS]
    text = log_text(log)
    assert "BUG" not in text and "Traceback" not in text
    assert "control command failed" in text


# -- one line for every mistake --------------------------------------------------------

def cli(*args: str) -> tuple[int, str, str]:
    res = memfs(*args, check=False)
    return res.returncode, res.stdout, res.stderr


def test_cli_errors_are_one_line(small, tmp_path) -> None:
    pm, _ = small
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    missing = str(tmp_path / "nothere")
    cases = [
        (("mount", pm), 2, "memfs: no mount point given"),
        (("mount", pm, missing), 1, f"memfs: mount point {missing} does not exist"),
        (("mount", pm, mnt, "--bogus"), 2,
         "memfs: unrecognized arguments: --bogus (see memfs --help)"),
        (("mount", pm, mnt, "--mode", "9"), 2,
         "memfs: --mode 9: not an octal file mode (000 to 777)"),
        (("mount", pm, mnt, "--prefetch-rate", "fast"), 2,
         "memfs: --prefetch-rate fast: bad size 'fast'"),
        (("mount", pm, mnt, "--log", f"{missing}/log"), 1,
         f"memfs: {missing}/log: No such file or directory"),
        (("mount", missing, mnt), 1, f"memfs: cannot read page map {missing}: "
                                     "No such file or directory"),
        (("capture", "--ram", missing, "--volume", str(tmp_path / "v2"), "--out",
          str(tmp_path / "pm2")), 1, f"memfs: cannot read RAM {missing}: "
                                     "No such file or directory"),
        (("mount", pm, mnt, "--region"), 2,
         "memfs: argument --region: expected one argument (see memfs mount --help)"),
        (("umount", mnt), 1, f"memfs: {mnt} is not mounted"),
        (("umount", "/proc"), 1, "memfs: /proc is not a memfs mount (it is proc)"),
        (("stats", mnt), 1, f"memfs: cannot read stats of {mnt}: No such file or directory"),
        (("load", mnt, pm), 1, f"memfs: {mnt}/.memfs/control: No such file or directory"),
    ]
    for args, code, line in cases:
        rc, out, err = cli(*args)
        print(f"\n[cli] memfs {' '.join(args)} -> {rc}: {err.strip()}")
        assert rc == code, (args, err)
        assert err.count("\n") == 1 and err.startswith("memfs: "), (args, err)
        assert "Traceback" not in err
        if line is not None:
            assert err == line + "\n", args
        assert out == ""


def test_cli_server_gone_and_disk_full(tmp_path, ram) -> None:
    from nbdserver import free_port
    path, _ = ram
    port = free_port()
    rc, out, err = cli("capture", "--ram", path, "--volume", f"nbd://127.0.0.1:{port}/",
                       "--out", str(tmp_path / "pm"), "--no-progress")
    print(f"\n[cli] server gone -> {rc}: {err.strip()}")
    assert rc == 1 and out == ""
    assert err == (f"memfs: cannot open volume: nbd://127.0.0.1:{port}/: cannot connect: all "
                   f"attempts to connect to 127.0.0.1:{port} failed\n")

    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        rc, out, err = cli("capture", "--ram", path, "--volume", str(full / "vol"),
                           "--out", str(tmp_path / "pm"), "--no-progress")
        print(f"\n[cli] disk full -> {rc}: {err.strip()}")
        assert rc == 1 and out == ""
        assert re.fullmatch(rf"memfs: {full}/vol: write at \d+: No space left on device\n", err)
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_daemon_logs_are_private(small, tmp_path) -> None:
    pm, _ = small
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    res = memfs("mount", pm, mnt)
    logfile = re.search(r"log (/run/memfs/[^)]+)\)", res.stdout)[1]
    try:
        assert stat.S_IMODE(os.stat("/run/memfs").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(logfile).st_mode) == 0o600
    finally:
        memfs("umount", mnt)
        os.unlink(logfile)


def test_a_bug_keeps_its_traceback(tmp_path) -> None:
    """Only expected failures are one line: a fault in memfs itself (here a
    sub-command that raises TypeError) shows its traceback and a BUG line."""
    code = ("import sys, memfs.cli as c, memfs.cli.stats as s\n"
            "def broken(a):\n"
            "    raise TypeError('boom')\n"
            "s.cmd_stats = broken\n"
            "sys.exit(c.main(['stats', '/']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("Traceback (most recent call last):\n")
    assert res.stderr.endswith("TypeError: boom\nmemfs: BUG: unexpected TypeError: boom (the "
                               "traceback above; please report it)\n")
