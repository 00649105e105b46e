"""Disk index and disk references (issue 6): build, load, find, refuse, re-index.

Pure logic on files, then capture with a referencer, then a qcow2 disk served
by a real qemu-nbd (read-only and not), re-indexed through its overlay.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs import msgfile
from memfs.capture import CaptureError, capture
from memfs.index.build import build_index, changed_ranges_qcow2
from memfs.index.format import BLOCK, CHUNK, FORMAT, DiskIndex, DiskIndexError
from memfs.index.referencer import DiskReferencer, aopen_referencer, open_referencer
from memfs.volume import remote_split
from memfs.pagemap import PageMap, PageState, checksum
from nbdserver import qemu_nbd
from ramimage import memfs

PS = 4096


def make_disk(path: str, nblocks: int, seed: int = 7) -> bytes:
    """Random blocks, a zero MiB, a few duplicates, and a 1000-byte tail."""
    rnd = random.Random(seed)
    blocks = [rnd.randbytes(BLOCK) for _ in range(nblocks)]
    for i in range(256, min(512, nblocks)):
        blocks[i] = bytes(BLOCK)
    if nblocks > 700:
        blocks[700] = blocks[600]
    data = b"".join(blocks) + rnd.randbytes(1000)
    with open(path, "wb") as f:
        f.write(data)
    return data


def blocks_of(data: bytes) -> list[bytes]:
    return [data[o:o + BLOCK] for o in range(0, len(data) - BLOCK + 1, BLOCK)]


def build(uri: str, **kw: object) -> tuple[DiskIndex, object]:
    return trio.run(lambda: build_index(uri, progress=False, **kw))  # type: ignore[arg-type]


@pytest.fixture
def disk(tmp_path) -> tuple[str, bytes]:
    path = str(tmp_path / "disk.raw")
    return path, make_disk(path, 1280)     # 5 MiB + 1000 bytes


def test_build_and_lookup(disk) -> None:
    path, data = disk
    index, res = build(path)
    blocks = blocks_of(data)
    distinct = {b for b in blocks if any(b)}
    assert len(index) == len(distinct) == res.entries
    assert res.zero_blocks == 256 and res.bytes_read == len(data)
    assert len(index.chunks) == 6
    for i, b in enumerate(blocks):
        off = index.lookup(checksum(b))
        if not any(b):
            assert off is None
        else:
            assert off is not None and data[off:off + BLOCK] == b
    assert index.lookup(checksum(b"x" * BLOCK)) is None
    assert index.lookup(checksum(data[5 * CHUNK:])) is None      # the partial tail


def test_save_load_roundtrip(disk, tmp_path) -> None:
    path, _ = disk
    index, _ = build(path)
    out = tmp_path / "d.idx"
    index.save(out)
    back = DiskIndex.load(out)
    assert (back.disk, back.size) == (index.disk, index.size)
    assert back.hashes == index.hashes and back.blocks == index.blocks
    assert back.chunks == index.chunks
    # compact: 16 bytes per distinct block, 8 per MiB, a small header
    assert os.path.getsize(out) < 16 * len(index) + 8 * len(index.chunks) + 400


def test_incremental_fingerprint(disk, tmp_path) -> None:
    path, data = disk
    old, _ = build(path)
    new_block = random.Random(3).randbytes(BLOCK)
    with open(path, "r+b") as f:           # change one block in chunk 2
        f.seek(2 * CHUNK + 5 * BLOCK)
        f.write(new_block)
    index, res = build(path, base=old)
    assert res.mode == "fingerprint"
    assert res.blocks_hashed == CHUNK // BLOCK and res.chunks_reused == 5
    full, _ = build(path)
    assert set(index.hashes) == set(full.hashes)
    assert index.lookup(checksum(new_block)) == 2 * CHUNK + 5 * BLOCK
    gone = data[2 * CHUNK + 5 * BLOCK:2 * CHUNK + 6 * BLOCK]
    assert index.lookup(checksum(gone)) is None
    # nothing changed: nothing hashed
    _, res = build(path, base=index)
    assert res.blocks_hashed == 0 and res.chunks_reused == 6


def test_changed_ranges_limit_reads(disk) -> None:
    path, data = disk
    old, _ = build(path)
    with open(path, "r+b") as f:
        f.seek(4 * CHUNK)
        f.write(b"\1" * BLOCK)
    index, res = build(path, base=old, changed=[(4 * CHUNK, BLOCK)])
    assert res.mode == "changed-ranges" and res.bytes_read == CHUNK
    full, _ = build(path)
    assert index.hashes == full.hashes and index.chunks == full.chunks


# -- malformed indexes -----------------------------------------------------------

@pytest.fixture(scope="module")
def good_blob(tmp_path_factory) -> bytes:
    path = str(tmp_path_factory.mktemp("idx") / "disk.raw")
    make_disk(path, 300)
    return build(path)[0].dumps()


def _doc(blob: bytes) -> dict:
    return msgfile.loads(FORMAT, blob)


def _pack(doc: object) -> bytes:
    """``doc`` in a valid envelope: what the field checks see past the checksum."""
    return msgfile.dumps(FORMAT, [msgpack.packb(doc, use_bin_type=True)])


def test_envelope_is_checked(good_blob) -> None:
    with pytest.raises(DiskIndexError, match=r"not a msgpack disk index \(bad magic\)"):
        DiskIndex.loads(b"MEMFS-PM" + good_blob[8:])
    with pytest.raises(DiskIndexError, match="unsupported disk index version 9"):
        DiskIndex.loads(good_blob[:8] + (9).to_bytes(4, "little") + good_blob[12:])
    flipped = bytearray(good_blob)
    flipped[len(flipped) // 2] ^= 4
    with pytest.raises(DiskIndexError, match="disk index checksum mismatch"):
        DiskIndex.loads(bytes(flipped))
    old = msgpack.packb({"magic": "memfs-index", "version": 1, **_doc(good_blob)})
    with pytest.raises(DiskIndexError, match="a version 1 disk index .no checksum."):
        DiskIndex.loads(old)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("hashes"), "missing 'hashes'"),
    (lambda d: d.update(size="big"), "'size' should be int"),
    (lambda d: d.update(size=-1), "bad disk size"),
    (lambda d: d.update(block_size=512), "unsupported block"),
    (lambda d: d.update(blocks=d["blocks"][:-8]), "equal length"),
    (lambda d: d.update(chunks=d["chunks"] + bytes(8)), "'chunks' holds"),
    (lambda d: d.update(hashes=d["hashes"][8:16] + d["hashes"][:8] + d["hashes"][16:]),
     "not sorted"),
    (lambda d: d.update(blocks=(10 ** 6).to_bytes(8, "little") + d["blocks"][8:]),
     "beyond the disk"),
    (lambda d: d.update(meta=[]), "'meta' should be a map"),
])
def test_malformed_fields(good_blob, change, match) -> None:
    doc = _doc(good_blob)
    change(doc)
    with pytest.raises(DiskIndexError, match=match):
        DiskIndex.loads(_pack(doc))


def test_unreadable_file(tmp_path) -> None:
    with pytest.raises(DiskIndexError, match="cannot read disk index .*missing.idx: No such file"):
        DiskIndex.load(tmp_path / "missing.idx")
    (tmp_path / "garbage.idx").write_bytes(b"\xc1garbage")
    with pytest.raises(DiskIndexError, match="garbage.idx"):
        DiskIndex.load(tmp_path / "garbage.idx")


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_garbage(blob: bytes) -> None:
    try:
        DiskIndex.loads(blob)
    except DiskIndexError:
        pass


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_truncated_and_mutated(good_blob, data) -> None:
    blob = bytearray(good_blob)
    cut = data.draw(st.integers(0, len(blob)))
    if data.draw(st.booleans()):
        blob = blob[:cut]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    try:
        DiskIndex.loads(bytes(blob))
    except DiskIndexError:
        pass


@settings(max_examples=200, deadline=2000)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=64)
                    | st.text(max_size=16),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=4)),
       st.dictionaries(st.sampled_from(["disk", "size", "hashes", "blocks", "chunks",
                                        "block_size", "chunk_size", "meta"]),
                       st.integers(-2**63, 2**64 - 1) | st.binary(max_size=64)
                       | st.text(max_size=8)))
def test_fuzz_structured(value, fields) -> None:
    for doc in (value, fields):
        try:
            DiskIndex.loads(_pack(doc))
        except DiskIndexError:
            pass


# -- referencing -------------------------------------------------------------------

def test_referencer_finds_and_verifies(disk, tmp_path) -> None:
    path, data = disk
    index, _ = build(path)
    os.chmod(path, 0o444)
    index.save(tmp_path / "d.idx")
    blocks = blocks_of(data)

    async def main() -> None:
        ref = await aopen_referencer(path, str(tmp_path / "d.idx"))
        try:
            for i in (0, 1, 600, 700, 1279):
                off = await ref.find(checksum(blocks[i]), blocks[i])
                assert off is not None and data[off:off + BLOCK] == blocks[i]
            other = b"\2" * BLOCK
            assert await ref.find(checksum(other), other) is None
            # a page whose checksum matches a block but whose bytes differ
            assert await ref.find(checksum(blocks[5]), other) is None
            assert ref.stats["mismatches"] == 1
            for i in range(1, 256):                 # the same window: no more reads
                await ref.find(checksum(blocks[i]), blocks[i])
            assert ref.stats["hits"] == 5 + 255
            assert ref.stats["windows_read"] <= 4
        finally:
            await ref.aclose()
    trio.run(main)


def test_refuses_writable_and_stale(disk, tmp_path) -> None:
    path, data = disk
    index, _ = build(path)
    idx = str(tmp_path / "d.idx")
    index.save(idx)
    os.chmod(path, 0o644)
    with pytest.raises(CaptureError, match="not read-only.*writable.*--disk-frozen"):
        open_referencer(path, idx)
    assert isinstance(open_referencer(path, idx, frozen=True), DiskReferencer)
    os.chmod(path, 0o444)
    open_referencer(path, idx)
    # the disk changed after indexing: refused as stale
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(os.urandom(5 * CHUNK))
    os.chmod(path, 0o444)
    with pytest.raises(CaptureError, match="stale"):
        open_referencer(path, idx)
    # another size: refused
    other = str(tmp_path / "other.raw")
    make_disk(other, 100)
    os.chmod(other, 0o444)
    with pytest.raises(CaptureError, match="re-run memfs index"):
        open_referencer(other, idx)
    (tmp_path / "bad.idx").write_bytes(b"nope")
    with pytest.raises(CaptureError, match="index: .*bad.idx"):
        open_referencer(path, str(tmp_path / "bad.idx"))


def _ram_with_disk_pages(path: str, disk_data: bytes, nblocks_from_disk: int) -> bytes:
    """A RAM image: random pages, zero pages, and disk blocks in a shuffled order."""
    rnd = random.Random(11)
    blocks = [b for b in blocks_of(disk_data) if any(b)][:nblocks_from_disk]
    pages = blocks + [rnd.randbytes(PS) for _ in range(300)] + [bytes(PS)] * 200
    rnd.shuffle(pages)
    ram = b"".join(pages)
    with open(path, "wb") as f:
        f.write(ram)
    return ram


def test_capture_references_disk(disk, tmp_path) -> None:
    path, data = disk
    index, _ = build(path)
    idx = str(tmp_path / "d.idx")
    index.save(idx)
    os.chmod(path, 0o444)
    ram_path = str(tmp_path / "vm.ram")
    ram = _ram_with_disk_pages(ram_path, data, 800)

    async def main(volume: str, ref) -> object:
        return await capture([("ram0", ram_path)], volume, str(tmp_path / (volume[-5:] + ".pm")),
                             referencer=ref, progress=False)
    plain = trio.run(main, str(tmp_path / "a.vol"), None)
    refd = trio.run(main, str(tmp_path / "b.vol"), open_referencer(path, idx))
    assert plain.pages_referenced == 0
    assert refd.pages_referenced == 800
    assert plain.bytes_written - refd.bytes_written == 800 * PS
    pm = PageMap.load(str(tmp_path / "b.vol.pm"))
    r = pm.region("ram0")
    d = pm.disks.index(path)
    disk_pages = 0
    with open(path, "rb") as f, open(str(tmp_path / "b.vol"), "rb") as vol:
        for p in range(r.npages):
            page = ram[p * PS:(p + 1) * PS]
            if r.states[p] == PageState.ZERO:
                assert not any(page)
                continue
            src = f if r.disks[p] == d else vol
            disk_pages += r.disks[p] == d
            src.seek(r.offsets[p])
            assert src.read(PS) == page
    assert disk_pages == 800
    assert remote_split(pm) == {"pages_on_volume": 300, "pages_on_disks": 800}


def test_cli_index_and_capture(disk, tmp_path) -> None:
    path, data = disk
    idx = str(tmp_path / "d.idx")
    res = memfs("index", path, "--out", idx, "--no-progress")
    assert "1023 distinct blocks" in res.stdout, res.stdout   # 1280 - 256 zero - 1 duplicate
    ram_path = str(tmp_path / "vm.ram")
    _ram_with_disk_pages(ram_path, data, 100)
    args = ("capture", "--ram", ram_path, "--volume", str(tmp_path / "v.vol"),
            "--out", str(tmp_path / "v.pm"), "--disk", path, "--index", idx, "--no-progress")
    res = memfs(*args, check=False)
    assert res.returncode == 1 and "is not read-only" in res.stderr, res.stderr
    os.chmod(path, 0o444)
    res = memfs(*args)
    assert "100 referenced on a disk" in res.stdout, res.stdout
    res = memfs("index", path, "--out", idx + "2", "--base", idx, "--json")
    assert '"blocks_hashed": 0' in res.stdout
    res = memfs("index", path, "--out", idx + "3", "--base", str(tmp_path / "nope"), check=False)
    assert res.returncode == 1 and "base index" in res.stderr


# -- NBD: a qcow2 image through qemu-nbd ------------------------------------------------

needs_nbd = pytest.mark.skipif(not (shutil.which("qemu-nbd") and shutil.which("qemu-img")
                                    and shutil.which("qemu-io")),
                               reason="needs qemu-nbd, qemu-img and qemu-io (qemu-utils)")


@pytest.mark.nbd
@needs_nbd
def test_qcow2_through_nbd(disk, tmp_path) -> None:
    path, data = disk
    base = str(tmp_path / "base.qcow2")
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", path, base],
                   check=True, timeout=60)
    os.chmod(base, 0o444)
    idx = str(tmp_path / "base.idx")
    with qemu_nbd(base, "qcow2", read_only=True) as srv:
        index, res = build(srv.uri)
        assert res.entries == 1023 and index.size == -(-len(data) // 512) * 512  # qcow2 rounds up
        index.save(idx)
        ref = open_referencer(srv.uri, idx)         # read-only export: accepted
        blocks = blocks_of(data)

        async def find() -> int | None:
            try:
                return await ref.find(checksum(blocks[900]), blocks[900])
            finally:
                await ref.aclose()
        assert trio.run(find) == 900 * BLOCK
    with qemu_nbd(base, "qcow2", read_only=False) as srv:
        with pytest.raises(CaptureError, match="NBD export is not advertised read-only"):
            open_referencer(srv.uri, idx)
        assert isinstance(open_referencer(srv.uri, idx, frozen=True), DiskReferencer)

    # freeze again: an overlay took writes; re-index only what it holds
    overlay = str(tmp_path / "overlay.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                    overlay], check=True, timeout=60)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {3 * CHUNK} 8k", overlay],
                   check=True, timeout=60, capture_output=True)
    changed = changed_ranges_qcow2(overlay)
    assert changed and all(o < 4 * CHUNK and o + n > 3 * CHUNK for o, n in changed)
    os.chmod(overlay, 0o444)
    with qemu_nbd(overlay, "qcow2", read_only=True) as srv:
        inc, res = build(srv.uri, base=index, changed=changed)
        assert res.mode == "changed-ranges" and res.bytes_read == CHUNK
        full, _ = build(srv.uri)
    assert inc.hashes == full.hashes and inc.chunks == full.chunks
    assert inc.lookup(checksum(b"\x5a" * BLOCK)) == 3 * CHUNK
    for p in (base, overlay):
        os.chmod(p, stat.S_IRUSR | stat.S_IWUSR)
