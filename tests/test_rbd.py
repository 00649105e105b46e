"""RBD disks on a real single-host Ceph cluster (tests/ceph.py): the URI, the
back end, capture to an RBD volume, references to an RBD snapshot, an OSD
killed and restarted under a reader.  One cluster serves the whole session."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from memfs.disks import DiskError, open_disk, parse_uri
from memfs.disks.rbd import escape
from memfs.pagemap import PageMap, PageState
from ramimage import PS, make_ram, memfs, mounted, read_stat

# -- the URI (no cluster) ------------------------------------------------------

BAD = [
    ("rbd:", "rbd:: rbd disks are named rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]"
             "[:conf=PATH][:id=NAME][:keyring=PATH]"),
    ("rbd:img", "rbd:img: rbd disks are named rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]"
                "[:conf=PATH][:id=NAME][:keyring=PATH]"),
    ("rbd:p//i", "rbd:p//i: rbd disks are named rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]"
                 "[:conf=PATH][:id=NAME][:keyring=PATH]"),
    ("rbd:p/i@", "rbd:p/i@: empty snapshot name after @"),
    ("rbd:p/i@a@b", "rbd:p/i@a@b: more than one @snapshot"),
    ("rbd:p/i:user=x", "rbd:p/i:user=x: unknown option 'user' for rbd: "
                       "(known: conf, id, keyring, mon_host, timeout)"),
    ("rbd:p/i:conf", "rbd:p/i:conf: rbd options are key=value (got 'conf')"),
    ("rbd:p/i:timeout=0", "rbd:p/i:timeout=0: timeout must be a positive number of seconds"),
    ("rbd:p/i\0", "rbd:p/i\0: an rbd name cannot hold a NUL byte"),
]


@pytest.mark.parametrize("uri,message", BAD)
def test_bad_rbd_uris_are_one_disk_error(uri: str, message: str) -> None:
    with pytest.raises(DiskError) as e:
        parse_uri(uri)
    assert str(e.value) == message


def test_rbd_uri_fields() -> None:
    u = parse_uri(r"rbd:vms/ns/disk\:1@frozen:conf=/etc/ceph/a\:b.conf:id=memfs:timeout=5")
    assert (u.scheme, u.pool, u.namespace, u.image, u.snap) == ("rbd", "vms", "ns", "disk:1",
                                                                 "frozen")
    assert u.query == {"conf": "/etc/ceph/a:b.conf", "id": "memfs", "timeout": "5"}
    assert u.export == "vms/ns/disk:1@frozen"
    assert parse_uri("rbd:p/i").snap == ""


_names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                 min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(pool=_names, image=_names, snap=st.none() | _names,
       opts=st.dictionaries(st.sampled_from(["conf", "id", "keyring", "mon_host"]), _names))
def test_rbd_uri_roundtrip(pool: str, image: str, snap: str | None,
                           opts: dict[str, str]) -> None:
    uri = f"rbd:{escape(pool)}/{escape(image)}" + (f"@{escape(snap)}" if snap else "") \
        + "".join(f":{k}={escape(v)}" for k, v in opts.items())
    u = parse_uri(uri)
    assert (u.pool, u.image, u.snap, u.query) == (pool, image, snap or "", opts)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_rbd_name_parses_or_is_one_disk_error(text: str) -> None:
    try:
        u = parse_uri("rbd:" + text)
    except DiskError as e:
        assert str(e).startswith("rbd:" + text + ": ")
    else:
        assert u.scheme == "rbd" and u.pool and u.image


def _bindings_or_skip() -> None:
    try:
        import rbd  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the librbd Python bindings cannot be imported ({e})")


async def test_unreachable_cluster_and_missing_conf(tmp_path) -> None:
    """No cluster needed: a monitor nobody answers at fails open at the URI's
    timeout; no ceph.conf and no mon_host fails at once; one line each."""
    _bindings_or_skip()
    keyring = tmp_path / "k.keyring"
    subprocess.run(["ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n",
                    "client.admin"], check=True, capture_output=True)
    dead = rf"rbd:rbd/x:mon_host=127.0.0.1\:1:keyring={keyring}:timeout=2"
    t = trio.current_time()
    with pytest.raises(DiskError) as e:
        await open_disk(dead)
    took = trio.current_time() - t
    assert str(e.value) == f"{dead}: cannot open: connect to the monitors: Connection timed out"
    noconf = "rbd:rbd/x:conf=" + str(tmp_path / "none.conf")
    with pytest.raises(DiskError) as e:
        await open_disk(noconf)
    assert str(e.value) == f"{noconf}: cannot open: conf {tmp_path}/none.conf: No such file"
    print(f"\nunreachable monitor: open failed after {took:.2f} s")


# -- the back end and the CLI on a real cluster ---------------------------------


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _child_read(path: str, seed: int) -> tuple[bytes, float]:
    """Every page of ``path`` as a separate process sees it through a mapping,
    first touches in a random order; and how long that took."""
    code = ("import mmap,os,random,sys\n"
            "f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n"
            "n=len(m)//4096; order=list(range(n)); random.Random(int(sys.argv[2])).shuffle(order)\n"
            "for p in order: m[p*4096:p*4096+1]\n"
            "sys.stdout.buffer.write(m[:])\n")
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code, path, str(seed)], capture_output=True,
                         timeout=600)
    took = time.monotonic() - t
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return res.stdout, took


@pytest.mark.ceph
async def test_rbd_disk_write_read_and_refusals(ceph_cluster) -> None:
    c = ceph_cluster
    name = _name("vol")
    uri = c.uri(name)
    with pytest.raises(DiskError) as e:
        await open_disk(uri)
    assert str(e.value) == f"{uri}: cannot open: image {name}: No such file or directory"
    blob = os.urandom(3 << 20)
    disk = await open_disk(uri, writable=True, create_size=8 << 20)  # created here
    async with disk:
        assert disk.size == 8 << 20
        await disk.write(4096, blob)
        await disk.flush()
        assert await disk.read(4096, len(blob)) == blob
        with pytest.raises(DiskError) as e:
            await disk.read((8 << 20) - 4096, 8192)
        assert str(e.value) == f"{uri}: 8192 bytes at 8384512 is beyond the end (8388608 bytes)"
        assert disk.stats()["rbd_bytes_written"] == len(blob)
    assert c.export(name)[4096:4096 + len(blob)] == blob   # Ceph's own tool agrees
    c.snap(name, "s1")
    with pytest.raises(DiskError) as e:
        await open_disk(c.uri(name, "s1"), writable=True)
    assert str(e.value) == f"{c.uri(name, 's1')}: a snapshot is read-only; a volume must be " \
                           "an image"
    async with await open_disk(c.uri(name, "s1")) as snap:
        assert await snap.read(4096, len(blob)) == blob
        with pytest.raises(DiskError) as e:
            await snap.write(0, b"x")
        assert str(e.value) == f"{c.uri(name, 's1')}: opened read-only"
    bad = f"rbd:nopool/{name}:conf={c.conf}:keyring={c.keyring}"
    with pytest.raises(DiskError) as e:
        await open_disk(bad)
    assert str(e.value) == f"{bad}: cannot open: pool nopool: No such file or directory"
    noconf = f"rbd:rbd/{name}:conf=/nonexistent.conf"
    with pytest.raises(DiskError) as e:
        await open_disk(noconf)
    assert str(e.value) == f"{noconf}: cannot open: conf /nonexistent.conf: No such file"


@pytest.mark.ceph
@pytest.mark.slow
async def test_read_deadline_while_the_osd_is_down(ceph_cluster) -> None:
    """With the only OSD dead, a read ends at the URI's timeout with one line;
    a disk with the default timeout rides the restart out, and the one that
    timed out reads again (nothing to reopen)."""
    c = ceph_cluster
    name = _name("dl")
    blob = os.urandom(1 << 20)
    async with await open_disk(c.uri(name), writable=True, create_size=4 << 20) as d:
        await d.write(0, blob)
        await d.flush()
    uri = c.uri(name) + ":timeout=2"
    async with await open_disk(uri) as d, await open_disk(c.uri(name)) as patient:
        c.kill_osd()
        try:
            t = trio.current_time()
            with pytest.raises(DiskError) as e:
                await d.read(0, 4096)
            took = trio.current_time() - t
            assert str(e.value) == f"{uri}: read of 4096 bytes at 0 failed: timed out after " \
                                   f"{took:.1f} s (no answer from the cluster)"
            assert d.stats()["rbd_timeouts"] == 1
        finally:
            c.start_osd()
        t = trio.current_time()
        assert await patient.read(0, len(blob)) == blob     # default timeout: 60 s
        back = trio.current_time() - t
        assert await d.read(0, len(blob)) == blob
    print(f"\nread failed after {took:.2f} s with the OSD down; after the restart the next "
          f"read took {back:.1f} s")


@pytest.mark.ceph
@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_capture_to_rbd_volume_and_mount(ceph_cluster, tmp_path) -> None:
    c = ceph_cluster
    ram = str(tmp_path / "vm.ram")
    data = make_ram(ram, 2048)                      # 8 MiB
    vol = c.uri(_name("vol"))                       # created by the capture
    pm = str(tmp_path / "vm.pm")
    res = memfs("capture", "--ram", ram, "--volume", vol, "--out", pm)
    assert PageMap.load(pm).disks == [vol], res.stdout
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt):
        got, took = _child_read(os.path.join(mnt, "ram0"), 7)
        assert got == data
        assert read_stat(mnt, "checksum_failures") == 0
        assert read_stat(mnt, "pages_remote") == 0
    print(f"\n8 MiB first-touched from RBD through the mount in {took:.2f} s")


def _disk_image(path: str, nblocks: int) -> bytes:
    rnd = random.Random(3)
    data = b"".join(rnd.randbytes(PS) if i % 5 else bytes(PS) for i in range(nblocks))
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.mark.ceph
@pytest.mark.mount
@pytest.mark.usefixtures("needs_fuse")
def test_references_to_an_rbd_snapshot(ceph_cluster, tmp_path) -> None:
    c = ceph_cluster
    img = _name("disk")
    src = str(tmp_path / "disk.raw")
    disk = _disk_image(src, 1024)                   # 4 MiB, 820 non-zero blocks
    c.import_image(src, img)
    c.snap(img, "frozen")
    snap = c.uri(img, "frozen")
    idx = str(tmp_path / "disk.idx")
    memfs("index", snap, "--out", idx, "--no-progress")
    # RAM: 400 blocks of the disk, 200 pages of its own, 100 zero pages
    rnd = random.Random(5)
    blocks = [disk[i * PS:(i + 1) * PS] for i in range(1024) if i % 5][:400]
    pages = blocks + [rnd.randbytes(PS) for _ in range(200)] + [bytes(PS)] * 100
    rnd.shuffle(pages)
    data = b"".join(pages)
    ram = str(tmp_path / "vm.ram")
    with open(ram, "wb") as f:
        f.write(data)
    # the image itself may change: refused without --disk-frozen
    image = c.uri(img)
    res = memfs("capture", "--ram", ram, "--volume", str(tmp_path / "v0"), "--out",
                str(tmp_path / "pm0"), "--disk", image, "--index", idx, check=False)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        f"memfs: disk {image} is not read-only: an RBD image can change (name one of its "
        "snapshots: rbd:POOL/IMAGE@SNAP). A page map may only refer to data that will not "
        "change: freeze the disk (a qcow2 external snapshot, see docs/disk-references.rst) "
        "and make it read-only, or pass --disk-frozen if you guarantee that it will not "
        "change while the page map refers to it")
    # the snapshot is frozen: accepted as it is; the volume is on RBD too
    vol = c.uri(_name("vol"))
    pm = str(tmp_path / "vm.pm")
    memfs("capture", "--ram", ram, "--volume", vol, "--out", pm, "--disk", snap,
          "--index", idx)
    m = PageMap.load(pm)
    r = m.region("ram0")
    on_snap = sum(1 for p in range(r.npages)
                  if r.states[p] == PageState.REMOTE and m.disks[r.disks[p]] == snap)
    assert on_snap == 400
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt):
        got, _ = _child_read(os.path.join(mnt, "ram0"), 9)
        assert got == data


@pytest.mark.ceph
@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.usefixtures("needs_fuse")
def test_osd_killed_and_restarted_mid_read(ceph_cluster, tmp_path) -> None:
    """kill -9 of the only OSD while a process is first-touching the mount, a
    MiB every 50 ms: its reads wait for the OSD to come back (librbd resends),
    then every byte is right and no read failed."""
    c = ceph_cluster
    ram = str(tmp_path / "vm.ram")
    data = make_ram(ram, 8192)                      # 32 MiB
    vol = c.uri(_name("vol"))
    pm = str(tmp_path / "vm.pm")
    memfs("capture", "--ram", ram, "--volume", vol, "--out", pm)
    mnt = str(tmp_path / "mnt")
    with mounted(pm, mnt, "--no-prefetch"):
        remote0 = read_stat(mnt, "pages_remote")
        code = ("import mmap,sys,time\n"
                "f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n"
                "for o in range(0,len(m),1<<20): m[o:o+(1<<20)]; time.sleep(0.05)\n"
                "sys.stdout.buffer.write(m[:])\n")
        with open(str(tmp_path / "got"), "wb") as out:
            reader = subprocess.Popen([sys.executable, "-c", code,
                                       os.path.join(mnt, "ram0")], stdout=out,
                                      stderr=subprocess.PIPE)
            while read_stat(mnt, "pages_remote") == remote0:   # its first reads are done
                assert reader.poll() is None
                time.sleep(0.01)
            c.kill_osd()
            killed = time.monotonic()
            try:
                at_kill = read_stat(mnt, "pages_remote")
                time.sleep(2)
                assert reader.poll() is None, "the reader finished with the only OSD dead"
                assert 0 < read_stat(mnt, "pages_remote") <= at_kill < remote0
            finally:
                c.start_osd()
            restarted = time.monotonic()
            _, err = reader.communicate(timeout=300)
        done = time.monotonic()
        assert reader.returncode == 0, err.decode()[-2000:]
        assert (tmp_path / "got").read_bytes() == data
        assert read_stat(mnt, "checksum_failures") == 0
        assert read_stat(mnt, "read_errors") == 0 and read_stat(mnt, "fetch_errors") == 0
        assert read_stat(mnt, "pages_remote") == 0
    print(f"\nOSD killed with {at_kill} of {remote0} pages remote; down "
          f"{restarted - killed:.1f} s; reader done {done - restarted:.1f} s after the "
          f"restart ({done - killed:.1f} s after the kill)")


@pytest.mark.ceph
@pytest.mark.qemu
@pytest.mark.mount
@pytest.mark.slow
async def test_migrate_a_guest_with_its_volume_on_rbd(ceph_cluster, guest, shm,
                                                       tmp_path) -> None:
    """A running guest moves onto memfs; the volume its pages go to is an RBD
    image; the destination faults them in from Ceph; its checksums hold, also
    after the host dropped its page cache."""
    from memfs import control
    from memfs.qemu import VM, file_backend
    from memfs.qemu.guest import guest_config, read_sum
    from memfs.qemu.migrate import MigrateOptions, migrate
    from test_migrate import FILL, RAM, check_report, check_sum, drop_caches, waiting_mount

    c = ceph_cluster
    vol = c.uri(_name("guest"))
    src_ram = shm / "src.ram"
    src_cfg = guest_config(guest, file_backend(src_ram, RAM), "src", fill_mib=FILL)
    with waiting_mount(tmp_path / "m1") as mnt, trio.fail_after(120):
        dst_cfg = guest_config(guest, file_backend(mnt / "ram0", RAM, share=True), "dst",
                               incoming="defer", fill_mib=FILL)
        async with VM.start(src_cfg, tmp_path) as src, VM.start(dst_cfg, tmp_path) as dst:
            await src.console.expect(r"^READY", 30)
            await trio.sleep(0.5)
            before = await read_sum(src.console, "before")
            opts = MigrateOptions(source_qmp=None, rams=[("ram0", str(src_ram))], volume=vol,
                                  pagemap=str(tmp_path / "vm.pagemap"), dest_qmp=None,
                                  dest_mount=str(mnt), passes=1, timeout=60)
            rep = await migrate(opts, src.qmp, dst.qmp)
            print(rep.text())
            check_report(rep)
            assert rep.volume == vol and rep.volume_bytes >= FILL // 2 * (1 << 20), rep
            assert rep.pages_remote_at_resume > FILL * 256 // 2, rep
            after = await read_sum(dst.console, "after", 30)
            check_sum(guest, after, before)
            st = control.read_stats(mnt)
            assert st["pages_fetched"] > 0 and st["checksum_failures"] == 0, st
            await trio.sleep(1)
            await trio.to_thread.run_sync(drop_caches)
            later = await read_sum(dst.console, "later", 30)
            check_sum(guest, later, before)
            assert later.gen > after.gen
    assert PageMap.load(str(tmp_path / "vm.pagemap")).disks == [vol]


# -- Ceph on the three-host rig, with delay on the storage links ----------------

@pytest.mark.ceph
@pytest.mark.slow
def test_ceph_on_the_rig_through_the_storage_delay() -> None:
    """The cluster on the rig's storage host, its clients on the source and the
    destination hosts: with the storage relay (tests/rig.py delay_storage) in
    front of every port the cluster's maps name, a write from the source and a
    read from the destination are byte-identical, cross each host's own
    storage link (kernel counters), and a 4 KiB read takes at least the
    relay's round trip."""
    import ceph
    from rig import Rig
    why = ceph.missing()
    if why:
        pytest.skip(why)
    if not all(shutil.which(t) for t in ("ip", "tc", "nsenter")):
        pytest.skip("the rig needs ip, tc and nsenter")
    delay = 0.005
    with Rig(storage="1gbit") as rig, ceph.ceph_cluster(
            rig.storage_ip, tuple(rig.prefix("sto")), mon_port=3300,
            osd_ports=(6800, 6807)) as c:
        rig.delay_storage(c.client_ports(), delay)
        c.create_image("rig", 16 << 20)
        data = random.Random(7).randbytes(8 << 20)

        def on(host: str, job) -> object:
            def body() -> object:
                import rados
                import rbd
                with rados.Rados(conffile=c.conf, rados_id="admin") as cl, \
                        cl.open_ioctx(c.pool) as io, rbd.Image(io, "rig") as img:
                    return job(img)
            return rig.in_ns(host, body)

        def write(img) -> None:
            img.write(data, 0)
            img.flush()

        def read(img) -> tuple[bytes, list[float]]:
            got = img.read(0, len(data))
            times = []
            for i in range(5):
                t = time.monotonic()
                assert img.read(i * 4096, 4096) == data[i * 4096:(i + 1) * 4096]
                times.append(time.monotonic() - t)
            return got, times

        s0, d0 = rig.tx_bytes("storage-src"), rig.tx_bytes("storage-dst")
        on("src", write)
        got, times = on("dst", read)
        s1, d1 = rig.tx_bytes("storage-src"), rig.tx_bytes("storage-dst")
        assert got == data
        assert s1["src"] - s0["src"] >= len(data)        # source -> storage
        assert d1["sto"] - d0["sto"] >= len(data)        # storage -> destination
        assert min(times) >= 2 * delay
        print(f"\n4 KiB RBD reads through the {delay * 1000:g} ms storage relay: "
              f"{[round(t * 1000, 2) for t in times]} ms")


@pytest.mark.ceph
@pytest.mark.qemu
@pytest.mark.mount
@pytest.mark.slow
def test_bench_migrate_rig_rows_use_rbd_over_the_links(tmp_path) -> None:
    """``tools/bench-migrate --rig`` (small guest) with the rows that use
    storage most: the guest's disk, the frozen disk (an RBD snapshot) and the
    volumes on Ceph on the storage host, through the storage relay.  Each row
    migrates the guest intact; its stream is device state only; its pages
    cross the storage links (kernel counters); memfs+refs refers to the whole
    disk instead of writing it."""
    import ceph
    from memfs.qemu import qemu_binary
    why = ceph.missing()
    if why:
        pytest.skip(why)
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    import json
    out = tmp_path / "bench.json"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "bench-migrate"), "--rig", "1000",
         "--fill", "16", "--disk", "8", "--only", "memfs+refs,memfs-source", "--settle", "1",
         "--after", "1", "--timeout", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["config"]["rig_storage_delay_ms"] == 0.5
    refs, source = doc["results"]
    for r in (refs, source):
        assert r["ok"] is True, r
        assert r["link_bytes"] < (2 << 20), r          # device state only
        assert r["from_storage_bytes"] > (8 << 20), r  # the destination read its pages
    assert refs["ref_bytes"] >= 6 << 20, refs   # (nearly) every page of the guest's disk
    assert refs["to_storage_bytes"] >= refs["volume_bytes"], refs
    assert source["volume_bytes_before"] > (16 << 20), source   # copied in the background
