"""Faults of the disk layer, through real mounts and real NBD servers.

- A server that stops answering fails a READ at the NBD ``timeout``: the
  fetcher's retries, the client's resends and the kernel's own second READ
  share that one deadline (nbdkit's pause filter, qemu-nbd under SIGSTOP).
- A hostile server (a small one in this module: real sockets, real
  handshake) that sends oversized or endless reply chunks does not make the
  daemon allocate more than the request needs.
- A FIFO, socket, character device or directory named as a disk is refused
  at open with one line, not a hang.
- Every disk failure is a DiskError with the URI and what happened.
"""

from __future__ import annotations

import mmap
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.disks import DiskError, open_disk, parse_uri
from memfs.disks import nbd_proto as p
from memfs.fetcher import Fetcher, FetchError
from memfs.pagemap import PageMap, PageState, Region, checksum
from memfs.stats import Stats
from nbdserver import make_image, nbdkit_server, pattern_bytes, qemu_nbd
from ramimage import MEMFS, PS, make_ram, memfs, mounted, read_stat

MiB = 1 << 20

# ------------------------------------------------------------------ helpers


def capture_to(tmp_path, disk_uri: Callable[[str], str]) -> tuple[str, bytes, str, PageMap]:
    """Capture a 4 MiB RAM to a file volume, then point the page map at
    ``disk_uri(volume path)``: (page map path, RAM bytes, volume path, map)."""
    ram, vol, pm_path = (str(tmp_path / n) for n in ("ram", "vol", "pm"))
    data = make_ram(ram, 1024)
    memfs("capture", "--ram", ram, "--volume", vol, "--out", pm_path)
    pm = PageMap.load(pm_path)
    pm.disks = [disk_uri(vol)]
    pm.save(pm_path)
    return pm_path, data, vol, pm


def first_remote(pm: PageMap, start: int) -> int:
    r = pm.region("ram0")
    return next(i for i in range(start, r.npages) if r.states[i] == PageState.REMOTE)


#: run in a child: a thread that touches a FUSE page holds the GIL until it comes
TOUCH = r"""
import mmap, os, sys, time
path, how, page = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
t = time.monotonic()
try:
    if how == "mmap":
        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        data = m[page * 4096:(page + 1) * 4096]
    else:
        data = os.pread(fd, 4096, page * 4096)
    print("ok", time.monotonic() - t, data.hex(), flush=True)
except OSError as e:
    print("error", time.monotonic() - t, e.errno, e.strerror, flush=True)
"""


def touch(path: str, how: str, page: int, timeout: float = 120) -> tuple[str, float, str]:
    """Read one page in a child process: ("ok", seconds, hex bytes),
    ("error", seconds, "errno text") or ("SIGBUS", seconds, "")."""
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", TOUCH, path, how, str(page)],
                         capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - t
    if res.returncode == -signal.SIGBUS:
        return "SIGBUS", took, ""
    assert res.returncode == 0, res.stderr
    kind, secs, rest = res.stdout.split(" ", 2)
    return kind, float(secs), rest.strip()


def log_of(mnt: str) -> str:
    with open(mnt + ".log") as f:
        return f.read()


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set of a process (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


# ------------------------------------------------------------------ 1. the deadline

@contextmanager
def stalled_server(kind: str, vol: str) -> Iterator[tuple[str, Callable[[], None],
                                                           Callable[[], None]]]:
    """A server for ``vol`` and (uri, stall, resume): nbdkit's pause filter,
    or qemu-nbd stopped with SIGSTOP (its socket stays open, nothing answers)."""
    if kind == "nbdkit-pause":
        with nbdkit_server(["file", vol], pause=True) as srv:
            yield srv.uri, srv.pause, srv.resume
    else:
        with qemu_nbd(vol, read_only=True) as srv:
            assert srv.proc is not None
            pid = srv.proc.pid
            yield (srv.uri, lambda: os.kill(pid, signal.SIGSTOP),
                   lambda: os.kill(pid, signal.SIGCONT))


@pytest.mark.mount
@pytest.mark.nbd
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.parametrize("how", ["mmap", "pread"])
@pytest.mark.parametrize("kind", ["nbdkit-pause", "qemu-nbd-sigstop"])
@pytest.mark.expect_log("is stalled; dropping it", "failed: timed out after",
                        r"failed \(attempt 1\)", "GIVING UP", "read failed: ",
                        "failed less than 2 s ago")
def test_stalled_server_fails_the_read_at_the_deadline(tmp_path, kind: str, how: str) -> None:
    """timeout=3 with retries: the READ fails after ~3 s, not 4 x 3 x the kernel's re-send."""
    timeout = 3
    pm_path, data, vol, pm = capture_to(tmp_path, lambda v: v)
    with stalled_server(kind, vol) as (uri, stall, resume):
        pm.disks = [f"{uri}{'&' if '?' in uri else '?'}timeout={timeout}"]
        pm.save(pm_path)
        page = first_remote(pm, 300)
        mnt = str(tmp_path / "mnt")
        with mounted(pm_path, mnt, "--no-prefetch", "--retries", "3"):
            assert touch(f"{mnt}/ram0", how, 1)[0] == "ok"   # the server answers
            stall()
            try:
                kind_, took, what = touch(f"{mnt}/ram0", how, page)
            finally:
                resume()
            print(f"{kind} {how}: timeout={timeout} s, READ failed after {took:.2f} s")
            if how == "mmap":
                assert kind_ == "SIGBUS"
            else:
                assert (kind_, what) == ("error", "5 Input/output error")
            assert took < 2 * timeout            # was ~8 x the timeout and more
            assert read_stat(mnt, "nbd_timeouts") == 1
            assert read_stat(mnt, "fetch_retries") == 0   # no time was left for one
            log = log_of(mnt)
            # the time measured, not the deadline set: a loaded host reads 3.1
            assert re.search(r"failed: timed out after \d+\.\d s \(no reply from the server\)",
                             log)
            assert "no time left for a retry within 3 s" in log
            if read_stat(mnt, "read_errors") > 1:
                # the kernel asked again for the faulting page, and got its
                # answer at once
                assert read_stat(mnt, "reads_failed_fast") >= 1
                assert "failed moments ago, not asked again for 2 s" in log
            # once the server is back (and the 2 s window is over) the page comes
            time.sleep(2.1)
            ok, _, got = touch(f"{mnt}/ram0", "pread", page)
            assert (ok, bytes.fromhex(got)) == ("ok", data[page * PS:(page + 1) * PS])


@pytest.mark.nbd
async def test_fetcher_retries_share_the_deadline_and_recent_failures_fail_fast() -> None:
    """Without a kernel: one fetch with retries=5 against a paused server."""
    with nbdkit_server(["pattern", "4M"], pause=True) as srv:
        with trio.fail_after(60):
            disk = await open_disk(srv.uri + "&timeout=1")
            region = Region.empty("r", 16 * PS)
            for pg in range(16):
                region.set_remote(pg, 0, pg * PS, checksum(pattern_bytes(pg * PS, PS)))
            stats = Stats()
            fetcher = Fetcher([disk], stats, retries=5, retry_delay=0.01, fail_window=0.5)
            assert (await fetcher.fetch(region, [0]))[0] == pattern_bytes(0, PS)
            srv.pause()
            t = trio.current_time()
            with pytest.raises(FetchError) as e:
                await fetcher.fetch(region, [2, 3, 4])
            took = trio.current_time() - t
            assert took < 2                                  # 6 attempts x 1 s before
            assert re.search(r"timed out after 1\.\d s \(no reply from the server\)", str(e.value))
            assert str(e.value).endswith("; no time left for a retry within 1 s")
            assert e.value.pages == [2, 3, 4]
            # asked again at once (as the kernel does): no second deadline
            t = trio.current_time()
            with pytest.raises(FetchError) as e:
                await fetcher.fetch(region, [3])
            assert trio.current_time() - t < 0.5
            assert str(e.value).startswith("region r: 1 page(s) failed, first 3: failed "
                                           "moments ago, not asked again for 0.5 s: ")
            assert stats.counters["reads_failed_fast"] == 1
            assert stats.counters["fetch_requests"] == 2
            # a prefetch over them skips them and still fetches the rest
            srv.resume()
            with pytest.raises(FetchError) as e:
                await fetcher.fetch(region, [3, 4, 5, 6], prefetch=True)
            assert e.value.pages == [3, 4]
            assert sorted(e.value.partial) == [5, 6]  # type: ignore[attr-defined]
            assert bytes(e.value.partial[6]) == pattern_bytes(6 * PS, PS)  # type: ignore
            # after the window the same pages come
            await trio.sleep(0.6)
            got = await fetcher.fetch(region, [2, 3, 4])
            assert [bytes(got[i]) for i in (2, 3, 4)] == [pattern_bytes(i * PS, PS)
                                                           for i in (2, 3, 4)]
            await disk.aclose()


# ------------------------------------------------------------------ 2. hostile servers

class HostileServer:
    """An NBD server on a unix socket that negotiates correctly (structured
    replies, one read-only export) and then answers every READ with
    ``reply(cookie, offset, length)``: an iterator of byte strings, sent until
    it ends or the client hangs up.  Counts what it managed to send."""

    def __init__(self, path: str, size: int,
                 reply: Callable[[int, int, int], Iterator[bytes]]) -> None:
        self.path, self.size, self.reply = path, size, reply
        self.sent = 0
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(path)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _exactly(conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = conn.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.sendall(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT,
                                         p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
                self._exactly(conn, 4)
                while True:
                    _, opt, n = struct.unpack(">QII", self._exactly(conn, 16))
                    self._exactly(conn, n)
                    if opt == p.OPT_STRUCTURED_REPLY:
                        conn.sendall(_opt_reply(opt, p.REP_ACK))
                    elif opt == p.OPT_GO:
                        info = struct.pack(">HQH", p.INFO_EXPORT, self.size,
                                           p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY)
                        conn.sendall(_opt_reply(opt, p.REP_INFO, info)
                                     + _opt_reply(opt, p.REP_ACK))
                        break
                    else:
                        conn.sendall(_opt_reply(opt, p.REP_ERR_UNSUP))
                while True:
                    _, _, cmd, cookie, off, length = struct.unpack(
                        ">IHHQQI", self._exactly(conn, 28))
                    if cmd != p.CMD_READ:
                        return
                    for piece in self.reply(cookie, off, length):
                        conn.sendall(piece)
                        self.sent += len(piece)
        except (OSError, EOFError):
            return


def _opt_reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", p.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data


def _chunk_header(cookie: int, rtype: int, length: int, done: bool = False) -> bytes:
    return struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if done else 0,
                       rtype, cookie, length)


#: what a hostile server pours after a chunk header, at most: 1.5 GiB
FLOOD = 1536 * MiB


def _flood(first: bytes) -> Iterator[bytes]:
    yield first
    blob = b"\x41" * MiB
    for _ in range(FLOOD // MiB):
        yield blob


def huge_error_chunk(cookie: int, off: int, length: int) -> Iterator[bytes]:
    """An error chunk that claims 4 GiB, with a message length to match, then floods."""
    return _flood(_chunk_header(cookie, p.REPLY_TYPE_ERROR, 0xFFFFFFF0)
                  + struct.pack(">IH", p.EIO, 0xFFFF))


def huge_data_chunk(cookie: int, off: int, length: int) -> Iterator[bytes]:
    """A data chunk at the request's offset that claims 4 GiB, then floods."""
    return _flood(_chunk_header(cookie, p.REPLY_TYPE_OFFSET_DATA, 0xFFFFFFF0)
                  + struct.pack(">Q", off))


def endless_tiny_chunks(cookie: int, off: int, length: int) -> Iterator[bytes]:
    """One-byte data chunks, never DONE, then past the end of the request."""
    def gen() -> Iterator[bytes]:
        for i in range(length * 4):
            yield _chunk_header(cookie, p.REPLY_TYPE_OFFSET_DATA, 9) + struct.pack(
                ">QB", off + i % length, 0x41)
    return gen()


HOSTILE = {
    "huge-error-chunk": (huge_error_chunk,
                         "error chunk of 4294967280 bytes (an error chunk holds 6 to 4110)"),
    "huge-data-chunk": (huge_data_chunk, "chunk {off}+4294967272 outside the request "
                                         "{off}+{n}"),
    "endless-tiny-chunks": (endless_tiny_chunks, "more than {max} reply chunks for a read "
                                                 "of {n} bytes"),
}


@pytest.mark.nbd
@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_replies_drop_the_connection_not_the_memory(tmp_path, name) -> None:
    """The client alone (in this process): a clear DiskError after the
    retries, each over a new connection, and the server sent next to nothing."""
    reply, want = HOSTILE[name]
    srv = HostileServer(str(tmp_path / "s"), 64 * MiB, reply)
    try:
        with trio.fail_after(60):
            disk = await open_disk(srv.uri + "&retries=2&connections=1&timeout=20")
            with pytest.raises(DiskError) as e:
                await disk.read(8192, 65536)
            n = 65536
            msg = want.format(off=8192, n=n, max=4 + n // 512)
            assert str(e.value) == f"{srv.uri}&retries=2&connections=1&timeout=20: read of " \
                                   f"{n} bytes at 8192 failed: {msg}"
            st = disk.stats()
            assert (st["nbd_protocol_errors"], st["nbd_retries"], st["nbd_errors"]) == (3, 2, 1)
            await disk.aclose()
        assert srv.connections == 3
        # the socket buffers hold a few MiB; nothing close to the flood was taken
        assert srv.sent < 64 * MiB
    finally:
        srv.close()


@pytest.mark.mount
@pytest.mark.nbd
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.parametrize("name", ["huge-error-chunk", "huge-data-chunk"])
@pytest.mark.expect_log(r"connection \d+ dropped: ", r"reconnected \(connection",
                        "read of .* failed: ", r"failed \(attempt \d\)", "GIVING UP",
                        "read failed: ", "failed less than 2 s ago")
def test_hostile_server_behind_a_mount_keeps_daemon_memory_bounded(tmp_path, name) -> None:
    """Through the kernel: the READ gets EIO, the daemon's peak RSS barely moves."""
    reply, _ = HOSTILE[name]
    srv = HostileServer(str(tmp_path / "s"), 64 * MiB, reply)
    try:
        pm_path, data, _, pm = capture_to(tmp_path, lambda v: srv.uri + "&timeout=20")
        page = first_remote(pm, 300)
        mnt = str(tmp_path / "mnt")
        with mounted(pm_path, mnt, "--no-prefetch") as proc:
            before = vm_hwm_kib(proc.pid)
            kind, took, what = touch(f"{mnt}/ram0", "pread", page)
            after = vm_hwm_kib(proc.pid)
            print(f"{name}: {kind} {what} after {took:.2f} s; daemon VmHWM "
                  f"{before} -> {after} KiB; server sent {srv.sent} bytes")
            assert (kind, what) == ("error", "5 Input/output error")
            assert after - before < 64 * 1024        # 1.3 GB with the old client
            assert read_stat(mnt, "nbd_protocol_errors") >= 1
            msg = HOSTILE[name][1].split(" (")[0].split("{")[0]
            assert msg in log_of(mnt)
    finally:
        srv.close()


# ------------------------------------------------------------------ 3. not a disk

def _fifo(path: str) -> None:
    os.mkfifo(path)


def _sock(path: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)            # left bound: a socket file on disk
    s.close()


def _chardev(path: str) -> None:
    if os.geteuid():
        pytest.skip("mknod of a character device needs root")
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))    # /dev/null


NOT_DISKS = {
    "fifo": (_fifo, "a FIFO"),
    "socket": (_sock, "a socket"),
    "chardev": (_chardev, "a character device"),
    "directory": (os.mkdir, "a directory"),
}


def not_a_disk(path: str, kind: str) -> str:
    return (f"{path}: is {kind}, not a disk (a disk is a regular file or a block device)")


@pytest.mark.parametrize("name", sorted(NOT_DISKS))
@pytest.mark.parametrize("writable", [False, True], ids=["read", "write"])
async def test_non_disks_are_refused_at_open(tmp_path, name: str, writable: bool) -> None:
    make, kind = NOT_DISKS[name]
    path = str(tmp_path / name)
    make(path)
    link = str(tmp_path / "link")
    os.symlink(path, link)
    for uri, shown in ((path, path), ("file://" + path, "file://" + path), (link, link)):
        with trio.fail_after(5), pytest.raises(DiskError) as e:
            await open_disk(uri, writable=writable,
                            create_size=PS if writable else None)
        assert str(e.value) == not_a_disk(shown, kind)


async def test_block_device_is_a_disk(tmp_path) -> None:
    img = make_image(str(tmp_path / "img"), MiB, data=b"block device bytes")
    res = subprocess.run(["losetup", "-f", "--show", "-r", img], capture_output=True,
                         text=True)
    if res.returncode:
        pytest.skip(f"no loop device: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        async with await open_disk(dev) as disk:
            assert disk.size == MiB
            assert await disk.read(0, 18) == b"block device bytes"
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.parametrize("name", ["fifo", "chardev"])
def test_mount_and_capture_refuse_a_non_disk_in_one_line(tmp_path, name: str) -> None:
    """A FIFO used to hang the mount forever; now one line and status 1."""
    make, kind = NOT_DISKS[name]
    bad = str(tmp_path / name)
    pm_path, _, _, _ = capture_to(tmp_path, lambda v: bad)
    make(bad)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    t = time.monotonic()
    res = subprocess.run(MEMFS + ["mount", "-f", pm_path, str(mnt)], capture_output=True,
                         text=True, timeout=60)
    took = time.monotonic() - t
    print(f"mount with a {name} disk: {res.returncode} {res.stderr.strip()!r} in {took:.2f} s")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].endswith(not_a_disk(bad, kind)), res.stderr
    assert "Traceback" not in res.stderr
    res = memfs("capture", "--ram", str(tmp_path / "ram"), "--volume", bad,
                "--out", str(tmp_path / "pm2"), check=False, timeout=60)
    # capture may refuse it before the disk layer does (it checks its volume
    # itself): either way one line that names the path
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and bad in res.stderr, res.stderr
    assert not os.path.exists(tmp_path / "pm2")


# ------------------------------------------------------------------ 4. DiskError only

BAD_URIS = [
    ("", "empty disk name"),
    ("nbd://[::1/x", "nbd://[::1/x: not a valid URI: Invalid IPv6 URL"),
    ("nbd:///export", "nbd:///export: nbd:// needs a host"),
    ("nbd://h:99999/", "nbd://h:99999/: bad port"),
    ("nbd://h:x/", "nbd://h:x/: bad port"),
    ("nbd+unix:///e", "nbd+unix:///e: nbd+unix:// needs ?socket=PATH"),
    ("nbd://h/e?timout=5", "nbd://h/e?timout=5: unknown option 'timout' for nbd:// "
                           "(known: timeout, connections, retries)"),
    ("file:///x?timeout=1", "file:///x?timeout=1: unknown option 'timeout' for file:// "
                            "(known: none)"),
    ("file://host/x", "file://host/x: file URIs name a local path (file:///path)"),
    ("file://", "file://: file URIs name a local path (file:///path)"),
    ("ftp://h/x", "ftp://h/x: unsupported disk scheme 'ftp' (use a path, file://, nbd:// "
                  "or nbd+unix://)"),
    ("a\0b", "'a\\x00b': a path cannot hold a NUL byte"),
]


@pytest.mark.parametrize("uri,message", BAD_URIS)
async def test_bad_uris_are_one_disk_error(uri: str, message: str) -> None:
    with pytest.raises(DiskError) as e:
        parse_uri(uri)
    assert str(e.value) == message
    with pytest.raises(DiskError) as e:
        await open_disk(uri)
    assert str(e.value) == message


@pytest.mark.parametrize("query,message", [
    ("timeout=abc", "bad option: could not convert string to float: 'abc'"),
    ("timeout=", "bad option: could not convert string to float: ''"),
    ("timeout=nan", "timeout, connections and retries must be positive"),
    ("timeout=-1", "timeout, connections and retries must be positive"),
    ("connections=0", "timeout, connections and retries must be positive"),
    ("retries=1.5", "bad option: invalid literal for int() with base 10: '1.5'"),
])
async def test_bad_nbd_options_are_one_disk_error(tmp_path, query: str, message: str) -> None:
    uri = f"nbd+unix:///?socket={tmp_path}/none.sock&{query}"
    with pytest.raises(DiskError) as e:
        await open_disk(uri)
    assert str(e.value) == f"{uri}: {message}"


@pytest.mark.nbd
async def test_connection_failures_are_one_disk_error(tmp_path) -> None:
    regular = tmp_path / "regular"
    regular.write_bytes(b"not a socket")
    long_path = "/tmp/" + "x" * 120
    cases = [
        (f"nbd+unix:///?socket={tmp_path}/none.sock",
         "cannot connect: No such file or directory"),
        (f"nbd+unix:///?socket={regular}", "cannot connect: Connection refused"),
        (f"nbd+unix:///?socket={long_path}", "cannot connect: AF_UNIX path too long"),
        ("nbd://127.0.0.1:1/", "cannot connect: all attempts to connect to 127.0.0.1:1 failed"),
    ]
    for uri, message in cases:
        uri += ("&" if "?" in uri else "?") + "timeout=5"
        with trio.fail_after(10), pytest.raises(DiskError) as e:
            await open_disk(uri)
        assert str(e.value) == f"{uri}: {message}"
    # a server that says nothing at all: the open has the same deadline
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "mute"))
    srv.listen(1)
    try:
        with trio.fail_after(10), pytest.raises(DiskError) as e:
            await open_disk(f"nbd+unix:///?socket={tmp_path}/mute&timeout=0.5")
        assert str(e.value) == f"nbd+unix:///?socket={tmp_path}/mute&timeout=0.5: " \
                               "no answer within 0.5 s"
    finally:
        srv.close()


async def test_file_disk_failures_are_one_disk_error(tmp_path) -> None:
    path = str(tmp_path / "d")
    with pytest.raises(DiskError) as e:
        await open_disk(path)
    assert str(e.value) == f"{path}: cannot open: No such file or directory"
    with open(path, "wb") as f:
        f.write(b"x" * PS)
    disk = await open_disk(path)
    with pytest.raises(DiskError) as e:
        await disk.read(PS - 1, 2)
    assert str(e.value) == f"{path}: read of 2 bytes at {PS - 1} is beyond the end " \
                           f"({PS} bytes)"
    with pytest.raises(DiskError) as e:
        await disk.write(0, b"y")
    assert str(e.value) == f"{path}: opened read-only"
    await disk.aclose()
    with pytest.raises(DiskError) as e:
        await disk.read(0, 1)
    assert str(e.value) == f"{path}: disk is closed"
    sub = str(tmp_path / "d" / "x")     # a path through a regular file
    with pytest.raises(DiskError) as e:
        await open_disk(sub, writable=True, create_size=PS)
    assert str(e.value) == f"{sub}: cannot open: Not a directory"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.builds(
    lambda s, q: f"{s}://{q}", st.sampled_from(["nbd", "nbd+unix", "file", "x"]),
    st.text(max_size=60)))
def test_parse_uri_fuzz_gives_a_uri_or_a_disk_error(uri: str) -> None:
    try:
        parsed = parse_uri(uri)
    except DiskError as e:
        assert str(e)
        return
    assert parsed.scheme in ("file", "nbd", "nbd+unix")


async def test_a_new_file_disk_is_created_private_and_never_through_a_link(tmp_path) -> None:
    path = str(tmp_path / "new")
    async with await open_disk(path, writable=True, create_size=4 * PS) as disk:
        assert disk.size == 4 * PS
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    target, link = str(tmp_path / "elsewhere"), str(tmp_path / "dangling")
    os.symlink(target, link)
    with pytest.raises(DiskError) as e:
        await open_disk(link, writable=True, create_size=PS)
    assert str(e.value) == f"{link}: cannot open: File exists"
    assert not os.path.exists(target)


@pytest.mark.nbd
async def test_server_gone_says_why_at_the_deadline() -> None:
    with nbdkit_server(["pattern", "1M"]) as srv:
        with trio.fail_after(20):
            disk = await open_disk(srv.uri + "&timeout=1")
            assert await disk.read(0, 8) == pattern_bytes(0, 8)
            srv.kill()
            with pytest.raises(DiskError) as e:
                await disk.read(0, 4096)
            # a SIGKILLed nbdkit leaves its socket file behind: nobody listens on it
            assert re.fullmatch(re.escape(f"{srv.uri}&timeout=1: read of 4096 bytes at 0 failed: "
                                          "timed out after ") + r"1\.\d"
                                + re.escape(" s (server closed the connection; reconnecting: "
                                            "cannot connect: Connection refused)"), str(e.value))
            await disk.aclose()


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_mount_with_a_bad_disk_is_one_line(tmp_path) -> None:
    """The daemon opens the page map's disks before mounting: each failure is
    one line naming the URI, status 1, no traceback, nothing mounted."""
    mute = socket.socket(socket.AF_UNIX)      # listens, never answers
    mute.bind(str(tmp_path / "mute"))
    mute.listen(4)
    cases = [
        (f"nbd+unix:///?socket={tmp_path}/none.sock&timeout=2",
         "cannot connect: No such file or directory"),
        (f"nbd+unix:///?socket={tmp_path}/mute&timeout=1", "no answer within 1 s"),
        ("nbd://127.0.0.1:1/?timout=2",
         "unknown option 'timout' for nbd:// (known: timeout, connections, retries)"),
        (str(tmp_path / "missing"), "cannot open: No such file or directory"),
    ]
    pm_path, _, _, pm = capture_to(tmp_path, lambda v: v)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for uri, message in cases:
            pm.disks = [uri]
            pm.save(pm_path)
            t = time.monotonic()
            res = subprocess.run(MEMFS + ["mount", "-f", pm_path, str(mnt)],
                                 capture_output=True, text=True, timeout=60)
            print(f"mount with disk {uri}: {res.stderr.strip()!r} in "
                  f"{time.monotonic() - t:.2f} s")
            assert (res.returncode, res.stderr) == (1, f"memfs: {uri}: {message}\n")
            assert not os.path.ismount(mnt)
    finally:
        mute.close()
