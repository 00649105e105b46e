"""Faults of the files memfs reads and writes, and of capture's outputs.

- Every format (page map, disk index, trace) refuses garbage, truncation and
  flipped bits with its own error, never another exception (hypothesis).
- Files are created private (0600 under umask 000), never through a symbolic
  link: a link at the target or at the temporary name leaves its target as
  it was, also for a target owned by another user.
- A volume carries an identity: a recreated volume is refused by
  ``capture --base``, ``memfs mount`` and ``memfs load``, with one line.
- Capture locks its volume and page map: a second capture fails at once and
  names the first.  Its RAM comes from a memfs mount waiting for its page
  map, so the first capture holds its locks for as long as the test wants.
- A full file system, a dead NBD server and bad paths end in one line
  ``memfs: ...``, exit status 1, and nothing left behind.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs import fileio, msgfile
from memfs.index.format import DiskIndex, DiskIndexError
from memfs.pagemap import PageMap, PageMapError, PageState, Region
from memfs.trace import Trace, TraceError
from memfs.volume import IDENTITY_SIZE, decode, identity_offset
from nbdserver import make_image, nbdkit_server, qemu_nbd
from ramimage import MEMFS, PS, make_ram, memfs, mounted

NOBODY = 65534
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ memfs[.\w]* "
                      r"(DEBUG|INFO|WARNING): ")


# -- every format: garbage, truncation, flips ----------------------------------------

def _pagemap() -> bytes:
    pm = PageMap(disks=["/srv/vol"], meta={"volumes": {"/srv/vol": {"id": "x", "at": 0}}})
    r = Region.empty("ram0", 8 * PS)
    r.set_remote(3, 0, 3 * PS, 12345)
    pm.regions.append(r)
    return pm.dumps()


def _index() -> bytes:
    from array import array
    return DiskIndex("/srv/disk", 64 * PS, array("Q", [5, 9, 70]), array("Q", [1, 2, 3]),
                     array("Q", [77]), {"created": 1.0}).dumps()


def _trace() -> bytes:
    t = Trace()
    t.record("ram0", 100, [5, 3, 99, 7])
    t.record("pc.ram", 10, [1])
    return t.dumps()


FORMATS: dict[str, tuple[Callable[[bytes], object], type[Exception], bytes]] = {
    "pagemap": (PageMap.loads, PageMapError, _pagemap()),
    "index": (DiskIndex.loads, DiskIndexError, _index()),
    "trace": (Trace.loads, TraceError, _trace()),
}


def test_valid_files_load() -> None:
    for loads, _, good in FORMATS.values():
        loads(good)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_garbage_truncation_flips(fmt: str, data) -> None:
    loads, error, good = FORMATS[fmt]
    how = data.draw(st.sampled_from(["garbage", "truncate", "flip", "bytes", "append"]))
    if how == "garbage":
        blob = data.draw(st.binary(max_size=600))
        if blob[:8] == good[:8]:
            blob = blob[:7]
    elif how == "truncate":
        blob = good[:data.draw(st.integers(0, len(good) - 1))]
    elif how == "append":
        blob = good + data.draw(st.binary(min_size=1, max_size=16))
    elif how == "flip":
        b = bytearray(good)
        pos = data.draw(st.integers(0, len(b) - 1))
        b[pos] ^= 1 << data.draw(st.integers(0, 7))
        blob = bytes(b)
    else:
        b = bytearray(good)
        for pos in data.draw(st.sets(st.integers(0, len(b) - 1), min_size=1, max_size=6)):
            b[pos] ^= data.draw(st.integers(1, 255))
        blob = bytes(b)
    with pytest.raises(error):  # never loaded, never another exception
        loads(blob)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_files_on_disk(fmt: str, data, tmp_path) -> None:
    """The same through the file loaders, which read arrays straight from
    the file: truncated, extended or flipped files raise the format's error."""
    _, error, good = FORMATS[fmt]
    load = {"pagemap": PageMap.load, "index": DiskIndex.load, "trace": Trace.load}[fmt]
    b = bytearray(good)
    how = data.draw(st.sampled_from(["truncate", "append", "flip"]))
    if how == "truncate":
        b = b[:data.draw(st.integers(0, len(b) - 1))]
    elif how == "append":
        b += data.draw(st.binary(min_size=1, max_size=16))
    else:
        for pos in data.draw(st.sets(st.integers(0, len(b) - 1), min_size=1, max_size=4)):
            b[pos] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "f"
    path.write_bytes(b)
    with pytest.raises(error) as e:
        load(str(path))
    assert str(path) in str(e.value)


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=24)
    | st.text(max_size=8) | st.floats(allow_nan=False),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=10)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=150, deadline=None)
@given(doc=VALUES | st.dictionaries(st.sampled_from(["regions", "disks", "meta", "size"]),
                                    VALUES))
def test_fuzz_documents_in_a_valid_envelope(fmt: str, doc) -> None:
    """A crafted file with a correct checksum still meets the field checks."""
    loads, error, _ = FORMATS[fmt]
    f = {"pagemap": "memfs.pagemap", "index": "memfs.index.format", "trace": "memfs.trace"}[fmt]
    blob = msgfile.dumps(__import__(f, fromlist=["FORMAT"]).FORMAT, [msgpack.packb(doc)])
    try:
        loads(blob)
    except error:
        pass


def test_corrupt_files_name_themselves(tmp_path) -> None:
    for name, (_, error, good) in FORMATS.items():
        path = tmp_path / name
        bad = bytearray(good)
        bad[-1] ^= 0x10
        path.write_bytes(bad)
        load = {"pagemap": PageMap.load, "index": DiskIndex.load, "trace": Trace.load}[name]
        what = {"pagemap": "page map", "index": "disk index", "trace": "trace"}[name]
        with pytest.raises(error, match=f"^{path}: {what} checksum mismatch: the file is "
                                        "corrupt$"):
            load(str(path))


# -- files are private and never written through a link ---------------------------------

@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _victim(tmp_path, name: str = "victim") -> str:
    """A file owned by another user (nobody), as a symlink's target."""
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(b"belongs to nobody\n")
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o644)
    return path


def test_symlinked_targets_are_refused_and_their_targets_unchanged(tmp_path) -> None:
    victim = _victim(tmp_path)
    before = os.stat(victim)
    writers = {"trace": lambda p: Trace().save(p), "pagemap": lambda p: PageMap.loads(
        _pagemap()).save(p), "index": lambda p: DiskIndex.loads(_index()).save(p)}
    for name, write in writers.items():
        link = str(tmp_path / f"{name}.lnk")
        os.symlink(victim, link)
        with pytest.raises(OSError) as e:
            write(link)
        assert e.value.errno == errno.ELOOP
        assert str(e.value) == (f"[Errno {errno.ELOOP}] is a symbolic link (memfs never "
                                f"writes through one): '{link}'")
        assert os.readlink(link) == victim
    after = os.stat(victim)
    assert open(victim, "rb").read() == b"belongs to nobody\n"
    assert (after.st_uid, after.st_mode, after.st_mtime_ns) == \
        (NOBODY, before.st_mode, before.st_mtime_ns)
    assert sorted(os.listdir(tmp_path)) == sorted(["victim", "trace.lnk", "pagemap.lnk",
                                                   "index.lnk"])  # no temporary left


def test_a_symlink_at_the_temporary_name_is_never_followed(tmp_path, monkeypatch) -> None:
    victim = _victim(tmp_path)
    planted = ".pm.planted.tmp"
    os.symlink(victim, tmp_path / planted)
    monkeypatch.setattr(fileio, "tmp_name", lambda name: planted)  # every name taken
    with pytest.raises(FileExistsError):
        fileio.atomic_write(tmp_path / "pm", [b"data"])
    assert open(victim, "rb").read() == b"belongs to nobody\n"
    assert not os.path.exists(tmp_path / "pm")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(FileExistsError):  # a dangling link too: O_EXCL, never created through
        fileio.create_new(tmp_path / "dangling")
    assert not os.path.exists(tmp_path / "nowhere")


def test_files_are_0600_under_umask_000(tmp_path) -> None:
    ram = str(tmp_path / "ram")
    make_ram(ram, 64)
    vol, pm, idx, tr = (str(tmp_path / n) for n in ("vol", "pm", "idx", "tr"))
    res = subprocess.run(MEMFS + ["capture", "--ram", ram, "--volume", vol, "--out", pm],
                         capture_output=True, text=True, preexec_fn=lambda: os.umask(0))
    assert res.returncode == 0, res.stderr
    os.chmod(ram, 0o444)
    res = subprocess.run(MEMFS + ["index", ram, "--out", idx, "--no-progress"],
                         capture_output=True, text=True, preexec_fn=lambda: os.umask(0))
    assert res.returncode == 0, res.stderr
    with umask(0):
        Trace().save(tr)
    for path in (vol, pm, idx, tr):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert sorted(os.listdir(tmp_path)) == ["idx", "pm", "ram", "tr", "vol"]


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.expect_log("cannot write the working-set trace .*: is a symbolic link")
def test_trace_at_unmount_does_not_follow_a_symlink(tmp_path, ram) -> None:
    path, data = ram
    pm = str(tmp_path / "pm")
    memfs("capture", "--ram", path, "--volume", str(tmp_path / "vol"), "--out", pm)
    victim = _victim(tmp_path)
    os.symlink(victim, pm + ".trace")  # where the daemon writes its trace at unmount
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt, "--no-prefetch"):
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            assert f.read(PS * 4) == data[:PS * 4]
    assert open(victim, "rb").read() == b"belongs to nobody\n"
    assert os.stat(victim).st_uid == NOBODY
    assert os.readlink(pm + ".trace") == victim
    log = open(mnt + ".log").read()
    assert f"{pm}.trace: is a symbolic link (memfs never writes through one)" in log \
        or "is a symbolic link (memfs never writes through one)" in log, log[-2000:]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# -- volume identity ------------------------------------------------------------------------

def _capture(tmp_path, ram: str, vol: str, out: str, *extra: str,
             check: bool = True) -> subprocess.CompletedProcess:
    return memfs("capture", "--ram", ram, "--volume", vol, "--out", out, "--no-progress",
                 *extra, check=check)


def _one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    # log records (timestamped: the NBD client's INFO on connect) are not the answer
    lines = [ln for ln in res.stderr.strip().splitlines() if not LOG_LINE.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("memfs: "), res.stderr
    return lines[0]


def test_the_volume_carries_the_identity_the_page_map_records(tmp_path, ram) -> None:
    path, data = ram
    vol, pm = str(tmp_path / "vol"), str(tmp_path / "pm")
    _capture(tmp_path, path, vol, pm)
    at = identity_offset([len(data)])
    assert os.path.getsize(vol) == at + IDENTITY_SIZE
    with open(vol, "rb") as f:
        f.seek(at)
        ident = decode(f.read(IDENTITY_SIZE))
    assert PageMap.load(pm).meta["volumes"] == {vol: {"id": ident, "at": at}}
    _capture(tmp_path, path, vol, str(tmp_path / "pm2"), "--base", pm)  # same volume: fine
    assert PageMap.load(tmp_path / "pm2").meta["volumes"][vol]["id"] == ident


def test_base_on_a_recreated_volume_is_refused(tmp_path, ram) -> None:
    path, data = ram
    vol, pm = str(tmp_path / "vol"), str(tmp_path / "pm")
    _capture(tmp_path, path, vol, pm)
    want = PageMap.load(pm).meta["volumes"][vol]["id"]
    os.unlink(vol)
    open(vol, "wb").close()  # recreated, empty
    res = _capture(tmp_path, path, vol, str(tmp_path / "pm2"), "--base", pm, check=False)
    assert _one_line(res) == (
        f"memfs: base page map {pm} was captured to another volume {vol} (identity {want}; "
        "this one has none): the volume was recreated or replaced, and the base's pages are "
        "not on it; capture without --base")
    assert os.path.getsize(vol) == 0  # nothing written into it
    assert not os.path.exists(tmp_path / "pm2")


def test_a_volume_holding_other_data_is_not_written(tmp_path, ram) -> None:
    path, data = ram
    vol = str(tmp_path / "vol")
    with open(vol, "wb") as f:
        f.write(b"\x55" * (len(data) + IDENTITY_SIZE))
    res = _capture(tmp_path, path, vol, str(tmp_path / "pm"), check=False)
    assert _one_line(res) == (
        f"memfs: volume {vol} holds data that is not a memfs volume identity at offset "
        f"{len(data)}: not a memfs volume, or one laid out for other RAM sizes; refusing to "
        "write into it")
    assert open(vol, "rb").read() == b"\x55" * (len(data) + IDENTITY_SIZE)


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.expect_log("control command failed: load .* is not the volume the page map was "
                        "captured to")
def test_mount_and_load_refuse_a_recreated_volume(tmp_path, ram) -> None:
    path, data = ram
    vol, pm = str(tmp_path / "vol"), str(tmp_path / "pm")
    _capture(tmp_path, path, vol, pm)
    want = PageMap.load(pm).meta["volumes"][vol]["id"]
    # recreated with the same content but a fresh identity (a copy made by hand)
    _capture(tmp_path, path, str(tmp_path / "vol.new"), str(tmp_path / "other"))
    os.replace(tmp_path / "vol.new", vol)
    have = PageMap.load(tmp_path / "other").meta["volumes"][str(tmp_path / "vol.new")]["id"]
    expected = (f"volume {vol} is not the volume the page map was captured to (its identity "
                f"is {have}, the page map expects {want}): the volume was recreated or "
                "replaced")
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    res = memfs("mount", "-f", "--log", str(tmp_path / "log"), pm, mnt, check=False)
    assert _one_line(res) == f"memfs: {expected}"
    res = memfs("mount", pm, mnt, check=False)  # daemonized: through the readiness pipe
    assert res.returncode == 1 and res.stderr.strip() == f"memfs: mount failed: {expected}"
    with mounted(None, mnt, "--region", f"ram0:{len(data)}"):
        res = memfs("load", mnt, pm, check=False)
        assert _one_line(res) == f"memfs: load {pm}: {expected}"


@pytest.mark.nbd
def test_nbd_volume_recreated_is_refused_by_base(tmp_path, ram) -> None:
    path, data = ram
    img = str(tmp_path / "vol.img")
    size = identity_offset([len(data)]) + IDENTITY_SIZE
    make_image(img, size)
    pm = str(tmp_path / "pm")
    with qemu_nbd(img) as srv:
        _capture(tmp_path, path, srv.uri, pm)
    make_image(img, size)  # the export recreated
    with qemu_nbd(img) as srv:
        uri = srv.uri
        pm_uri = PageMap.load(pm).meta["volumes"]
        (old_uri, rec), = pm_uri.items()
        if old_uri != uri:  # the socket path differs per server: point the map at this one
            m = PageMap.load(pm)
            m.disks = [uri if d == old_uri else d for d in m.disks]
            m.meta["volume"] = uri
            m.meta["volumes"] = {uri: rec}
            m.save(pm)
        res = _capture(tmp_path, path, uri, str(tmp_path / "pm2"), "--base", pm, check=False)
    assert f"memfs: base page map {pm} was captured to another volume {uri} (identity " \
           f"{rec['id']}; this one has none)" in _one_line(res)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


# -- locks: a second capture fails at once ----------------------------------------------------

@contextmanager
def blocked_capture(tmp_path, data_path: str, size: int, vol: str,
                    out: str) -> Iterator[tuple[subprocess.Popen, Callable[[], None]]]:
    """A capture whose RAM is a memfs region waiting for its page map: it
    takes its locks, then blocks on its first read until ``release()``."""
    pm0 = str(tmp_path / "pm0")
    _capture(tmp_path, data_path, str(tmp_path / "vol0"), pm0)
    mnt = str(tmp_path / "src")
    with mounted(None, mnt, "--region", f"ram0:{size}", "--no-prefetch"):
        proc = subprocess.Popen(MEMFS + ["capture", "--ram", os.path.join(mnt, "ram0"),
                                         "--volume", vol, "--out", out, "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_lock(proc.pid, os.path.join(mnt, "ram0"))
            yield proc, lambda: memfs("load", mnt, pm0) and None
            _, proc.stderr_text = proc.communicate(timeout=60)  # type: ignore[attr-defined]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait_for_lock(pid: int, ram: str, n: int = 2) -> None:
    """Until ``pid`` holds ``n`` flocks (volume and page map) and has opened
    ``ram`` (it has checked the volume's identity then)."""
    deadline = time.monotonic() + 30
    while True:
        with open("/proc/locks") as f:
            held = [ln for ln in f if ln.split()[1] == "FLOCK" and ln.split()[4] == str(pid)]
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            opened = any(_readlink(f"/proc/{pid}/fd/{fd}") == ram for fd in fds)
        except OSError:
            opened = False
        if len(held) >= n and opened:
            return
        assert time.monotonic() < deadline, "the capture never took its locks"
        time.sleep(0.02)


@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_a_second_capture_to_the_same_volume_or_page_map_fails_at_once(tmp_path, ram) -> None:
    path, data = ram
    vol, out = str(tmp_path / "vol"), str(tmp_path / "pm")
    with blocked_capture(tmp_path, path, len(data), vol, out) as (first, release):
        res = _capture(tmp_path, path, vol, str(tmp_path / "other.pm"), check=False)
        line = _one_line(res)
        assert line.startswith(f"memfs: volume {vol} is in use by pid {first.pid} (")
        assert line.endswith("): another capture is writing it") and " capture " in line
        res = _capture(tmp_path, path, str(tmp_path / "vol2"), out, check=False)
        line = _one_line(res)
        assert line.startswith(f"memfs: page map {out} is in use by pid {first.pid} (")
        assert not os.path.exists(tmp_path / "vol2")  # the page map is locked first
        release()
    assert first.returncode == 0, first.stderr_text
    # the first capture is whole: every page on the volume as its map says
    r = PageMap.load(out).region("ram0")
    with open(vol, "rb") as v:
        for p in range(r.npages):
            if r.states[p] == PageState.REMOTE:
                v.seek(r.offsets[p])
                assert v.read(PS) == data[p * PS:(p + 1) * PS]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


@pytest.mark.nbd
@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_a_second_capture_to_the_same_nbd_export_fails_at_once(tmp_path, ram) -> None:
    path, data = ram
    size = identity_offset([len(data)]) + IDENTITY_SIZE
    with nbdkit_server(["memory", str(size)]) as srv:
        with blocked_capture(tmp_path, path, len(data), srv.uri, str(tmp_path / "pm")) \
                as (first, release):
            other = srv.uri + ("&" if "?" in srv.uri else "?") + "timeout=5"  # same export
            res = _capture(tmp_path, path, other, str(tmp_path / "other.pm"), check=False)
            line = _one_line(res)
            assert line.startswith(f"memfs: volume {other} is in use by pid {first.pid} (")
            release()
    assert first.returncode == 0, first.stderr_text


# -- inputs that are outputs, bad names, FIFOs, bad paths ---------------------------------

def test_outputs_that_are_inputs_are_refused(tmp_path, ram) -> None:
    path, data = ram
    ram2 = str(tmp_path / "ram2")
    os.link(path, ram2)  # another name, the same file
    disk = str(tmp_path / "disk")
    make_ram(disk, 64)
    os.chmod(disk, 0o444)
    memfs("index", disk, "--out", str(tmp_path / "idx"), "--no-progress")
    cases = [
        (["--ram", path, "--volume", ram2, "--out", str(tmp_path / "pm")],
         f"memfs: volume {ram2} is the same file as RAM {path}: refusing to write into it"),
        (["--ram", path, "--volume", str(tmp_path / "v"), "--out", ram2],
         f"memfs: page map {ram2} is the same file as RAM {path}: refusing to write into it"),
        (["--ram", path, "--volume", str(tmp_path / "v"), "--out", str(tmp_path / "v")],
         f"memfs: page map {tmp_path / 'v'} is the same file as volume {tmp_path / 'v'}: "
         "refusing to write into it"),
        (["--ram", path, "--volume", disk, "--out", str(tmp_path / "pm"), "--disk", disk,
          "--index", str(tmp_path / "idx")],
         f"memfs: volume {disk} is the same file as disk {disk}: refusing to write into it"),
        (["--ram", path, "--volume", str(tmp_path / "v2"), "--out", disk, "--disk", disk,
          "--index", str(tmp_path / "idx")],
         f"memfs: page map {disk} is the same file as disk {disk}: refusing to write into it"),
        (["--ram", f"a={path}", "--ram", f"a={ram2}", "--volume", str(tmp_path / "v3"),
          "--out", str(tmp_path / "pm")],
         "memfs: region name 'a' is given twice (--ram a=...): each region needs its own name"),
        (["--ram", f".memfs={path}", "--volume", str(tmp_path / "v3"), "--out",
          str(tmp_path / "pm")],
         f"memfs: --ram .memfs={path}: bad region name '.memfs'"),
    ]
    for args, message in cases:
        res = memfs("capture", "--no-progress", *args, check=False)
        assert _one_line(res) == message, args
    assert open(path, "rb").read() == data and os.path.getsize(ram2) == len(data)
    assert sorted(os.listdir(tmp_path)) == ["disk", "idx", "ram2", "vm.ram"]


def test_index_out_that_is_the_disk_or_a_link_is_refused(tmp_path) -> None:
    disk = str(tmp_path / "disk")
    data = make_ram(disk, 64)
    res = memfs("index", disk, "--out", disk, "--no-progress", check=False)
    assert _one_line(res) == (f"memfs: index {disk} is the same file as disk {disk}: refusing "
                              "to write into it")
    link = str(tmp_path / "link")
    os.symlink(_victim(tmp_path), link)
    res = memfs("index", disk, "--out", link, "--no-progress", check=False)
    assert _one_line(res) == (f"memfs: cannot write index {link}: is a symbolic link (memfs "
                              "never writes through one)")
    assert open(disk, "rb").read() == data
    assert open(tmp_path / "victim", "rb").read() == b"belongs to nobody\n"
    assert sorted(os.listdir(tmp_path)) == ["disk", "link", "victim"]


def test_fifo_and_directory_are_not_ram(tmp_path) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for ram in (fifo, str(tmp_path)):
        res = memfs("capture", "--ram", ram, "--volume", str(tmp_path / "v"), "--out",
                    str(tmp_path / "pm"), timeout=30, check=False)
        assert _one_line(res) == (f"memfs: RAM {ram} is not a regular file (a FIFO, device "
                                  "or directory cannot be guest RAM)")


def test_bad_paths_are_one_line(tmp_path, ram) -> None:
    path, _ = ram
    link = str(tmp_path / "link")
    os.symlink(_victim(tmp_path), link)
    cases = [
        (["--ram", str(tmp_path / "none"), "--volume", str(tmp_path / "v"), "--out",
          str(tmp_path / "pm")], f"memfs: cannot read RAM {tmp_path / 'none'}: No such file "
                                 "or directory"),
        (["--ram", path, "--volume", str(tmp_path / "v"), "--out", "/nonexistent/pm"],
         "memfs: page map /nonexistent/pm: directory /nonexistent does not exist"),
        (["--ram", path, "--volume", "/nonexistent/v", "--out", str(tmp_path / "pm")],
         "memfs: volume /nonexistent/v: cannot create: No such file or directory"),
        (["--ram", path, "--volume", link, "--out", str(tmp_path / "pm")],
         f"memfs: volume {link} is a symbolic link (memfs never writes through one, except "
         "a root-owned link to a block device)"),
        (["--ram", path, "--volume", str(tmp_path / "v"), "--out", link],
         f"memfs: page map {link} is a symbolic link (memfs never writes through one)"),
        (["--ram", path, "--volume", str(tmp_path / "v"), "--out", str(tmp_path / "pm"),
          "--base", str(tmp_path / "nobase")],
         f"memfs: base page map: cannot read page map {tmp_path / 'nobase'}: No such file or "
         "directory"),
    ]
    for args, message in cases:
        res = memfs("capture", "--no-progress", *args, check=False)
        assert _one_line(res) == message, args
    assert sorted(os.listdir(tmp_path)) == ["link", "victim", "vm.ram"]


# -- a full file system, a dead server ----------------------------------------------------------

@contextmanager
def small_tmpfs(path: str, size: str) -> Iterator[str]:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


@pytest.fixture
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount -t tmpfs)")


@pytest.mark.usefixtures("needs_root")
def test_full_file_system_is_one_line_and_leaves_nothing(tmp_path) -> None:
    ram = str(tmp_path / "ram")
    data = make_ram(ram, 1024)  # 4 MiB, 3 MiB of it non-zero
    with small_tmpfs(str(tmp_path / "small"), "1m") as small:
        # the volume does not fit
        vol = os.path.join(small, "vol")
        res = _capture(tmp_path, ram, vol, str(tmp_path / "pm"), check=False)
        line = _one_line(res)
        assert line.startswith(f"memfs: {vol}: write at ") and \
            line.endswith(": No space left on device"), line
        assert os.listdir(small) == [] and not os.path.exists(tmp_path / "pm")
        # the page map does not fit
        fd = os.open(os.path.join(small, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"x" * (64 << 10))
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        pm = os.path.join(small, "pm")
        res = _capture(tmp_path, ram, str(tmp_path / "vol"), pm, check=False)
        assert _one_line(res) == f"memfs: cannot write page map {pm}: No space left on device"
        assert os.listdir(small) == ["filler"]  # no page map, no temporary, no lock
        assert not os.path.exists(tmp_path / "vol")  # the volume it made is gone again
        # an existing volume is kept: its earlier pages stay valid
        _capture(tmp_path, ram, str(tmp_path / "vol"), str(tmp_path / "pm0"))
        res = _capture(tmp_path, ram, str(tmp_path / "vol"), pm, "--base",
                       str(tmp_path / "pm0"), check=False)
        assert _one_line(res) == f"memfs: cannot write page map {pm}: No space left on device"
        assert os.path.getsize(tmp_path / "vol") == len(data) + IDENTITY_SIZE
    assert sorted(os.listdir(tmp_path)) == ["pm0", "ram", "small", "vol"]


@pytest.mark.nbd
def test_no_nbd_server_is_one_line(tmp_path, ram) -> None:
    path, _ = ram
    uri = f"nbd+unix:///?socket={tmp_path}/none.sock"
    res = _capture(tmp_path, path, uri, str(tmp_path / "pm"), check=False)
    assert _one_line(res) == (f"memfs: cannot open volume: {uri}: cannot connect: No such "
                              "file or directory")
    assert os.listdir(tmp_path) == ["vm.ram"]


@pytest.mark.nbd
@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_nbd_server_dying_mid_capture_is_one_line(tmp_path, ram) -> None:
    path, data = ram
    out = str(tmp_path / "pm")
    size = identity_offset([len(data)]) + IDENTITY_SIZE
    with nbdkit_server(["memory", str(size)]) as srv:
        uri = srv.uri + ("&" if "?" in srv.uri else "?") + "timeout=3&retries=1"
        with blocked_capture(tmp_path, path, len(data), uri, out) as (first, release):
            srv.kill(signal.SIGKILL)  # the capture has written its identity; now it is gone
            t0 = time.monotonic()
            release()
        took = time.monotonic() - t0
    line = _one_line(subprocess.CompletedProcess(first.args, first.returncode, "",
                                                 first.stderr_text))
    assert line.startswith(f"memfs: {uri}: "), line
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or n.startswith(".")]
    print(f"capture failed {took:.2f}s after the server died: {line}")
