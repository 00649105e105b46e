"""The daemon is not a single point of failure (memfs.supervisor, memfs.takeover,
memfs.state): SIGKILL it under readers, writers and a running guest; the
supervisor starts another on the same FUSE connection, the requests the dead
one had taken are resent, and every page written before the kill reads back.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings, strategies as st

from memfs.mounttable import abort_connection, mounts_at
from memfs.pagemap import PageMap, PageState
from memfs.journal import HEADER, RECORD, Journal, StateError, replay
from memfs.supervisor import ask
from nbdserver import nbdkit_server
from ramimage import MEMFS, PS, drop_caches, is_mounted, memfs

MIB = 1 << 20


def fuse_abort(mnt: str) -> None:
    for entry in mounts_at(os.path.realpath(mnt)):
        abort_connection(entry)
    subprocess.run(["umount", "-l", mnt], capture_output=True)


@contextmanager
def supervised(args: list[str], mnt: str, log: str) -> Iterator[subprocess.Popen]:
    """``memfs mount -f ARGS`` (a supervisor in front); always unmounted."""
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.Popen(MEMFS + ["mount", "-f", "--log", log] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(mnt, ".memfs", "pid")):
            if proc.poll() is not None:
                raise AssertionError(f"mount exited {proc.returncode}: {proc.stderr.read()}"
                                     f"\n{Path(log).read_text() if os.path.exists(log) else ''}")
            assert time.monotonic() < deadline, "the mount did not come up"
            time.sleep(0.02)
        yield proc
    finally:
        if is_mounted(mnt):
            subprocess.run(MEMFS + ["umount", "--force", mnt], capture_output=True, timeout=60)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            fuse_abort(mnt)
            proc.kill()
            proc.wait()
        if is_mounted(mnt):
            fuse_abort(mnt)


def status(state: str) -> dict:
    return json.loads(ask(state, "status")[3:])


def kill_daemon(state: str, mnt: str) -> tuple[int, float]:
    """SIGKILL the daemon; return the new daemon's pid and how long a request
    issued right after the kill waited for an answer (the restart stall).
    The kill waits until the supervisor's standby daemon is loaded, as it is
    when a crash comes at any other time than right after a restart."""
    deadline = time.monotonic() + 30
    while not status(state)["standby_ready"]:
        assert time.monotonic() < deadline, "no standby daemon"
        time.sleep(0.02)
    old = status(state)["pid"]
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    with open(os.path.join(mnt, ".memfs", "pid")) as f:  # blocks until a successor serves
        new = int(f.read())
    took = time.monotonic() - t0
    assert new != old
    return new, took


def capture(tmp_path: Path, ram: str) -> str:
    pm = str(tmp_path / "vm.pagemap")
    memfs("capture", "--ram", ram, "--volume", str(tmp_path / "vol"), "--out", pm,
          "--no-progress")
    return pm


#: a child process that maps the region (a Python thread touching a FUSE page
#: would hold the GIL until it arrives) and writes/checks pages on command
WORKER = r"""
import mmap, os, random, sys
path, expect = sys.argv[1:]
want = bytearray(open(expect, "rb").read())
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, len(want), mmap.MAP_SHARED)
ps = 4096
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "write":          # write SEED COUNT SYNC
        rnd = random.Random(int(cmd[1]))
        for _ in range(int(cmd[2])):
            p = rnd.randrange(len(want) // ps)
            off = rnd.randrange(ps - 64)
            blob = rnd.randbytes(64)
            m[p * ps + off:p * ps + off + 64] = blob
            want[p * ps + off:p * ps + off + 64] = blob
        if cmd[3] == "1":
            m.flush()
        print("ok", flush=True)
    elif cmd[0] == "check":
        bad = [p for p in range(len(want) // ps) if m[p * ps:(p + 1) * ps] != want[p * ps:(p + 1) * ps]]
        print("ok" if not bad else f"bad {bad[:10]}", flush=True)
    elif cmd[0] == "dump":
        m.flush()
        open(cmd[1], "wb").write(want)
        print("ok", flush=True)
"""


class Worker:
    def __init__(self, path: str, expect: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, path, expect],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def cmd(self, line: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline().strip()
        assert out, f"worker died (status {self.proc.wait()}: {signal.Signals(-self.proc.returncode).name if self.proc.returncode and self.proc.returncode < 0 else ''})"
        return out

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


# -- the journal parser (no mount) -------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 500),
                          st.integers(1, 20)), max_size=40))
def test_journal_replay_is_what_was_appended(tmp_path_factory, ops) -> None:
    d = tmp_path_factory.mktemp("j")
    names = ["a", "b", "c"]
    j = Journal.create(str(d / "journal"), names)
    model = {n: (set(), set()) for n in names}

    class R:  # the one field the journal uses
        def __init__(self, name: str) -> None:
            self.name = name
    for wrote, r, first, count in ops:
        if wrote:
            j.wrote(R(names[r]), first, count)  # type: ignore[arg-type]
        else:
            j.kept(R(names[r]), list(range(first, first + count)))  # type: ignore[arg-type]
        model[names[r]][0 if wrote else 1].update(range(first, first + count))
    j.close()
    j2, sets = Journal.open(str(d / "journal"), names)
    j2.close()
    for n in names:
        for i in (0, 1):
            got = {p for p, v in enumerate(sets[n][i]) if v}
            assert got == model[n][i]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 10), st.integers(0, 255))
def test_journal_damage_is_refused_or_ends_it(tail: bytes, at: int, flip: int) -> None:
    """Any bytes after a valid header: StateError or a parse; a flipped byte
    in a record that is followed by others: refused."""
    head = HEADER.pack(b"MEMFS-JL", 1, 2)
    try:
        replay(head + tail, 2)
    except StateError:
        pass
    import xxhash
    recs = b""
    for seq in range(1, 4):
        h = RECORD.pack(1, 0, 1, 2, seq * 10, seq, 0)[:24]
        recs += h + xxhash.xxh3_64_intdigest(h).to_bytes(8, "little")
    sets, end = replay(head + recs + bytes(64), 2)
    assert end == HEADER.size + 3 * RECORD.size and sets[1][0].count(1) == 6
    bad = bytearray(recs)
    i = at % (2 * RECORD.size)  # in one of the first two records
    bad[i] ^= flip or 1
    with pytest.raises(StateError, match="damaged record at byte"):
        replay(head + bytes(bad), 2)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                              lambda c: st.lists(c, max_size=4)
                              | st.dictionaries(st.sampled_from(
                                  ["version", "mountpoint", "regions", "options", "x"]),
                                  c, max_size=5), max_leaves=12).map(
                     lambda v: json.dumps(v).encode())))
def test_state_meta_is_refused_or_read(tmp_path_factory, raw: bytes) -> None:
    """Whatever meta.json holds: a State, or StateError (one line)."""
    from memfs.state import State
    d = tmp_path_factory.mktemp("s")
    d.chmod(0o700)
    (d / "meta.json").write_bytes(raw)
    try:
        st_ = State.open(str(d))
    except StateError as e:
        assert "\n" not in str(e)
    else:
        assert st_.regions and all(type(v) is int and v > 0 for v in st_.regions.values())
        assert isinstance(st_.mountpoint, str) and isinstance(st_.store_dir, str)
        assert isinstance(st_.meta.get("options", {}), dict)


# -- real mounts ---------------------------------------------------------------------------



@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.expect_log(r"daemon \d+ died \(", r"daemon died: daemon \d+ took over the connection")
def test_mmap_writes_survive_repeated_sigkills(tmp_path, ram) -> None:
    path, data = ram
    pm = capture(tmp_path, path)
    mnt, state = str(tmp_path / "mnt"), str(tmp_path / "state")
    stalls = []
    with supervised(["--state", state, pm, mnt], mnt, str(tmp_path / "memfs.log")):
        w = Worker(os.path.join(mnt, "ram0"), path)
        assert w.cmd("check") == "ok"
        for k in range(6):
            # even rounds: msync'd (WRITEs acknowledged before the kill);
            # odd rounds: left dirty in the page cache, written back later
            assert w.cmd(f"write {k} 50 {1 - k % 2}") == "ok"
            _, took = kill_daemon(state, mnt)
            stalls.append(took)
            assert w.cmd("check") == "ok"
        drop_caches()  # every page comes from the daemons again
        assert w.cmd("check") == "ok"
        assert w.cmd(f"dump {tmp_path / 'want'}") == "ok"
        w.close()
        st = status(state)
        assert st["restarts"] == 6
        with open(os.path.join(mnt, ".memfs", "stats.json")) as f:
            stats = json.load(f)
        assert stats["checksum_failures"] == 0
        assert stats["pages_served"] == len(data) // PS  # a successor never pushes
    want = (tmp_path / "want").read_bytes()
    assert want != data
    ms = sorted(s * 1000 for s in stalls)
    print(f"\nrestart stall (request issued at SIGKILL): min {ms[0]:.0f} ms, "
          f"median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms; "
          f"supervisor's own count {st['stall_ms']}")

    # the mount is gone; its state brings everything back on a new connection
    with supervised(["--resume", state], mnt, str(tmp_path / "memfs2.log")):
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read() == want
    # ... and a fresh mount on that state is refused, naming the way out
    res = memfs("mount", "-f", "--state", state, pm, mnt, check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == (f"memfs: state directory {state} holds the state of another "
                                  f"mount (continue it with: memfs mount --resume {state})")


@pytest.mark.mount
@pytest.mark.nbd
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.expect_log(r"daemon \d+ died \(", r"daemon died: daemon \d+ took over the connection")
def test_read_taken_by_a_dead_daemon_is_resent(tmp_path, ram) -> None:
    """A READ the daemon had taken (its fetch held by a paused server) when
    it was SIGKILLed is answered by the successor: FUSE_NOTIFY_RESEND."""
    path, data = ram
    pm_path = capture(tmp_path, path)
    pm = PageMap.load(pm_path)
    page = next(p for p in range(300, 1024) if pm.region("ram0").states[p] == PageState.REMOTE)
    with nbdkit_server(["file", str(tmp_path / "vol")], pause=True) as srv:
        pm.disks = [srv.uri]
        pm.save(pm_path)
        mnt, state = str(tmp_path / "mnt"), str(tmp_path / "state")
        with supervised(["--state", state, "--no-prefetch", pm_path, mnt], mnt,
                        str(tmp_path / "memfs.log")):
            srv.pause()
            reader = subprocess.Popen(
                [sys.executable, "-c", "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); "
                 "sys.stdout.buffer.write(os.pread(fd, 4096, int(sys.argv[2])))",
                 os.path.join(mnt, "ram0"), str(page * PS)], stdout=subprocess.PIPE)
            time.sleep(1.0)
            assert reader.poll() is None  # waiting in the daemon for the server
            old = status(state)["pid"]
            os.kill(old, signal.SIGKILL)
            srv.resume()
            out, _ = reader.communicate(timeout=60)
            assert out == data[page * PS:(page + 1) * PS]
            assert status(state)["pid"] != old
    log = (tmp_path / "memfs.log").read_text()
    assert "FUSE connection taken over; unanswered requests resent" in log


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_live_upgrade_by_resume(tmp_path, ram) -> None:
    """``memfs mount --resume STATE`` while the supervisor runs: a new daemon
    takes over, the old one is gone, written pages are there."""
    path, data = ram
    pm = capture(tmp_path, path)
    mnt, state = str(tmp_path / "mnt"), str(tmp_path / "state")
    with supervised(["--state", state, pm, mnt], mnt, str(tmp_path / "memfs.log")):
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDWR)
        os.pwrite(fd, b"written before the upgrade", 77 * PS + 5)
        old = status(state)["pid"]
        t0 = time.monotonic()
        res = memfs("mount", "--resume", state)
        took = time.monotonic() - t0
        new = status(state)["pid"]
        assert new != old
        # the old daemon's main thread is gone when the new one serves; its
        # process (flushing its files, then a zombie until the supervisor's
        # next turn reaps it) may take a moment longer (supervisor.leader_gone)
        t1 = time.monotonic()
        while os.path.exists(f"/proc/{old}/status") and time.monotonic() < t1 + 10:
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{old}/status")
        gone = time.monotonic() - t1
        assert res.stdout.startswith(f"memfs: daemon of {mnt} restarted (pid={new} stall_ms=")
        drop_caches()
        want = bytearray(data)
        want[77 * PS + 5:77 * PS + 31] = b"written before the upgrade"
        assert os.pread(fd, len(data), 0) == bytes(want)
        os.close(fd)
        print(f"\nupgrade: {res.stdout.strip()} (command took {took * 1000:.0f} ms, the old "
              f"process gone {gone * 1000:.0f} ms later)")


# -- a running guest -----------------------------------------------------------------------

@pytest.mark.qemu
@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.expect_log(r"daemon \d+ died \(", r"daemon died: daemon \d+ took over the connection")
async def test_guest_survives_daemon_sigkills(guest, tmp_path: Path) -> None:
    import trio
    from memfs.qemu import VM, file_backend
    from memfs.qemu.guest import (expected_fill_md5, expected_work_md5, guest_config,
                                  read_sum)
    fill, ram_size = 32, 128 * MIB
    zero = tmp_path / "zero.ram"
    with open(zero, "wb") as f:
        f.truncate(ram_size)
    pm = capture(tmp_path, str(zero))
    mnt, state = str(tmp_path / "mnt"), str(tmp_path / "state")
    with supervised(["--state", state, pm, mnt], mnt, str(tmp_path / "memfs.log")):
        cfg = guest_config(guest, file_backend(Path(mnt) / "ram0", ram_size, share=True), "g",
                           fill_mib=fill)
        with trio.fail_after(240):
            async with VM.start(cfg, tmp_path) as vm:
                await vm.console.expect(r"^READY", 120)
                first = await read_sum(vm.console, "first", 60)
                assert first.fill == expected_fill_md5(guest, fill)

                async def tick_gap(during) -> int:  # the guest's longest tick gap (ms)
                    await vm.console.command("resetgap", r"^GAPRESET")
                    await trio.sleep(0.3)
                    await during()
                    await trio.sleep(1.0)
                    m = await vm.console.command("gap", r"^GAP (\d+)")
                    return int(m.group(1))

                base = await tick_gap(trio.lowlevel.checkpoint)
                last, stalls, gaps = first, [], []
                for k in range(4):
                    async def kill() -> None:
                        _, took = await trio.to_thread.run_sync(kill_daemon, state, mnt)
                        stalls.append(took)
                    gaps.append(await tick_gap(kill))
                    if k == 2:  # guest pages leave the page cache: the successor serves them
                        await trio.to_thread.run_sync(drop_caches)
                    s = await read_sum(vm.console, f"k{k}", 60)
                    assert s.fill == expected_fill_md5(guest, fill)
                    assert s.work == expected_work_md5(guest, s.gen)
                    assert s.gen > last.gen  # its ticks go on
                    last = s
                assert (await vm.qmp.execute("query-status"))["status"] == "running"
                print(f"\nguest: 4 SIGKILLs, request stalls "
                      f"{[round(t * 1000) for t in stalls]} ms; guest's longest tick gap "
                      f"around each kill {gaps} ms (without a kill: {base} ms); "
                      f"gen {first.gen} -> {last.gen}")
                await vm.qmp.execute("quit")
        assert status(state)["restarts"] == 4


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSEGV", "SIGABRT"])
@pytest.mark.expect_log(r"daemon \d+ died \(", r"daemon died: daemon \d+ took over the connection")
def test_acknowledged_write_survives_a_crash(tmp_path, ram, sig: str) -> None:
    """pwrite() returned, then the daemon dies at once (killed or crashed):
    the successor serves the written bytes after the page cache is dropped."""
    path, data = ram
    pm = capture(tmp_path, path)
    mnt, state = str(tmp_path / "mnt"), str(tmp_path / "state")
    with supervised(["--state", state, "--no-prefetch", pm, mnt], mnt,
                    str(tmp_path / "memfs.log")):
        deadline = time.monotonic() + 30
        while not status(state)["standby_ready"]:
            assert time.monotonic() < deadline, "no standby daemon"
            time.sleep(0.02)
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDWR)
        old = status(state)["pid"]
        os.pwrite(fd, b"acknowledged", 300 * PS + 9)      # a remote page, in part
        os.pwrite(fd, b"z" * (2 * PS), 8 * PS)             # a zero page and a remote one
        os.kill(old, getattr(signal, sig))
        drop_caches()
        want = bytearray(data)
        want[300 * PS + 9:300 * PS + 21] = b"acknowledged"
        want[8 * PS:10 * PS] = b"z" * (2 * PS)
        assert os.pread(fd, len(data), 0) == bytes(want)
        os.close(fd)
        assert status(state)["pid"] != old
    log = (tmp_path / "memfs.log").read_text()
    assert f"daemon {old} died (" in log


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_resume_after_supervisor_and_daemon_were_killed(tmp_path, ram) -> None:
    """Everything SIGKILLed right after an acknowledged write: the mount is
    dead, but ``memfs mount --resume STATE`` brings back every written page."""
    path, data = ram
    pm = capture(tmp_path, path)
    mnt, state = str(tmp_path / "mnt"), str(tmp_path / "state")
    with supervised(["--state", state, pm, mnt], mnt, str(tmp_path / "memfs.log")) as proc:
        fd = os.open(os.path.join(mnt, "ram0"), os.O_RDWR)
        os.pwrite(fd, b"kept through it all", 500 * PS + 100)
        st = status(state)
        for pid in (st["supervisor"], st["pid"]):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        with pytest.raises(OSError):  # the connection is gone
            os.close(fd)
        fuse_abort(mnt)
    want = bytearray(data)
    want[500 * PS + 100:500 * PS + 119] = b"kept through it all"
    with supervised(["--resume", state], mnt, str(tmp_path / "memfs2.log")):
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read() == bytes(want)


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.expect_log("^daemon failed$")
def test_daemon_that_cannot_start_is_one_line_and_leaves_no_state(tmp_path, ram) -> None:
    path, _ = ram
    pm_path = capture(tmp_path, path)
    pm = PageMap.load(pm_path)
    pm.disks = [str(tmp_path / "gone")]
    pm.save(pm_path)
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir()
    for _ in range(2):  # and the same command again: same answer, not "in use"
        res = memfs("mount", "--state", str(state), pm_path, str(mnt), check=False)
        assert res.returncode == 1
        assert res.stderr.strip() == (f"memfs: mount failed: {tmp_path / 'gone'}: cannot "
                                      "open: No such file or directory")
        assert not is_mounted(str(mnt)) and not (state / "meta.json").exists()


def test_state_directory_must_be_private(tmp_path, ram) -> None:
    """A symbolic link as --state, or a --resume directory others can enter,
    is refused before anything is mounted."""
    pm = capture(tmp_path, ram[0])
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "mnt").mkdir()
    res = memfs("mount", "--state", str(tmp_path / "link"), pm, str(tmp_path / "mnt"),
                check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == (f"memfs: state directory {tmp_path / 'link'} is not a "
                                  "directory (or is a symbolic link)")
    real.chmod(0o755)
    res = memfs("mount", "--resume", str(real), check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == (f"memfs: state directory {real} is open to other users "
                                  "(mode 755; want 700)")
