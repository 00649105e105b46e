"""The NBD client against real qemu-nbd and nbdkit servers that each test starts.

Data is checked byte for byte against what the server must hold; interop is
checked with other clients (qemu-img, nbdcopy).  Faults come from nbdkit's
error, delay and pause filters and from killing the server mid-read.
"""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest
import trio

from memfs.disks import DiskError, open_disk, parse_uri
from memfs.disks.nbd import NBDDisk

from nbdserver import make_image, nbdkit_server, pattern_bytes, qemu_nbd, qemu_nbd_server

pytestmark = pytest.mark.nbd

MiB = 1 << 20


async def nbd_open(uri: str, **kw: object) -> NBDDisk:
    disk = await NBDDisk.open(parse_uri(uri), **kw)  # type: ignore[arg-type]
    return disk


# ------------------------------------------------------------------ qemu-nbd

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_qemu_nbd_read_write_flush(tmp_path: object, fmt: str, tcp: bool) -> None:
    rng = random.Random(1)
    head = rng.randbytes(3 * MiB + 123)
    img = make_image(str(tmp_path / f"disk.{fmt}"), 16 * MiB, fmt, head)  # type: ignore
    ref = bytearray(16 * MiB)
    ref[:len(head)] = head
    with qemu_nbd_server(img, fmt=fmt, tcp=tcp) as uri:
        with trio.fail_after(30):
            disk = await open_disk(uri, writable=True)
            try:
                assert disk.size == 16 * MiB
                assert await disk.read(0, len(head)) == head
                # the zero tail comes back as hole chunks from qemu-nbd
                assert await disk.read(8 * MiB, 4 * MiB) == bytes(4 * MiB)
                assert await disk.read(3 * MiB, 2 * MiB) == bytes(ref[3 * MiB:5 * MiB])
                new = rng.randbytes(MiB + 7)
                await disk.write(5 * MiB + 3, new)
                ref[5 * MiB + 3:5 * MiB + 3 + len(new)] = new
                await disk.flush()
                assert await disk.read(5 * MiB, 2 * MiB) == bytes(ref[5 * MiB:7 * MiB])
            finally:
                await disk.aclose()
        # interop: another client reads exactly what we wrote
        out = tmp_path / "copy.raw"  # type: ignore
        ref_path = tmp_path / "ref.raw"  # type: ignore
        ref_path.write_bytes(ref)
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", uri,
                        str(ref_path)], check=True, timeout=60)
        subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=60)
        assert out.read_bytes() == bytes(ref)


async def test_qemu_nbd_many_in_flight_random(tmp_path: object) -> None:
    """64 concurrent random writes then reads, checked against a model."""
    size = 8 * MiB
    img = make_image(str(tmp_path / "d.raw"), size)  # type: ignore
    rng = random.Random(2)
    ref = bytearray(size)
    with qemu_nbd(img) as srv:
        with trio.fail_after(60):
            disk = await nbd_open(srv.uri, writable=True)
            # writes to distinct pages (no two in flight overlap)
            pages = rng.sample(range(size // 4096), 512)
            blobs = {pg: rng.randbytes(4096) for pg in pages}
            for pg, b in blobs.items():
                ref[pg * 4096:(pg + 1) * 4096] = b

            async def writer(chunk: list[int]) -> None:
                for pg in chunk:
                    await disk.write(pg * 4096, blobs[pg])
            async with trio.open_nursery() as n:
                for i in range(64):
                    n.start_soon(writer, pages[i::64])
            await disk.flush()

            async def reader(k: int) -> None:
                r = random.Random(k)
                for _ in range(20):
                    off = r.randrange(0, size - 70000)
                    ln = r.randrange(1, 70000)
                    assert await disk.read(off, ln) == bytes(ref[off:off + ln])
            async with trio.open_nursery() as n:
                for k in range(64):
                    n.start_soon(reader, k)
            assert disk.stats()["nbd_in_flight"] == 0
            assert disk.stats()["nbd_errors"] == 0
            await disk.aclose()
        with open(img, "rb") as f:
            assert f.read() == bytes(ref)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_reads_on_a_socket_skip_the_writer_task(tmp_path: object, tcp: bool) -> None:
    """On a real socket a read is written by its caller and its reply read
    from the bare socket (issue 11): the writer task sends nothing, the
    reader is the socket one, and the bytes (4 KiB to 2 MiB, one reply and
    replies received in place) are right; 32 readers at once too."""
    from memfs.disks.nbd_sock import SocketReader
    rng = random.Random(5)
    data = rng.randbytes(8 * MiB)
    img = make_image(str(tmp_path / "d.raw"), 8 * MiB, data=data)  # type: ignore
    with qemu_nbd(img, tcp=tcp) as srv:
        with trio.fail_after(60):
            disk = await nbd_open(srv.uri, connections=1)
            (conn,) = disk._pool.conns
            assert isinstance(conn.reader, SocketReader)
            for off, n in [(0, 4096), (12345, 4096), (MiB - 7, 2 * MiB), (5 * MiB, 300000)]:
                assert await disk.read(off, n) == data[off:off + n]
                assert not conn.outq and not conn.sending and not conn.waiters

            async def reader(k: int) -> None:
                r = random.Random(k)
                for _ in range(16):
                    off = r.randrange(0, 8 * MiB - 70000)
                    ln = r.randrange(1, 70000)
                    assert await disk.read(off, ln) == data[off:off + ln]
            async with trio.open_nursery() as n:
                for k in range(32):
                    n.start_soon(reader, k)
            assert not conn.waiters and not conn.pending
            assert disk.stats()["nbd_errors"] == 0
            await disk.aclose()


async def test_qemu_nbd_read_only_and_unknown_export(tmp_path: object) -> None:
    img = make_image(str(tmp_path / "d.raw"), MiB, data=b"abc")  # type: ignore
    with qemu_nbd(img, read_only=True, export="ro") as srv:
        with trio.fail_after(20):
            with pytest.raises(DiskError, match="read-only"):
                await nbd_open(srv.uri, writable=True)
            with pytest.raises(DiskError, match="unknown export|ERR|export"):
                await nbd_open(srv.uri.replace("/ro?", "/nope?"))
            disk = await nbd_open(srv.uri)
            assert await disk.read(0, 3) == b"abc"
            await disk.aclose()


async def test_connect_refused_is_disk_error(tmp_path: object) -> None:
    with trio.fail_after(10), pytest.raises(DiskError, match="cannot connect"):
        await open_disk(f"nbd+unix:///?socket={tmp_path}/none.sock")


async def test_acked_writes_lost_with_connection_make_flush_fail(tmp_path: object) -> None:
    """Capture's final flush must say when acknowledged writes may not have landed."""
    img = make_image(str(tmp_path / "d.raw"), 4 * MiB)  # type: ignore
    with qemu_nbd(img) as srv:
        with trio.fail_after(30):
            disk = await nbd_open(srv.uri, writable=True, timeout=10)
            await disk.write(0, b"x" * 4096)
            srv.restart()
            with pytest.raises(DiskError, match="may not have landed"):
                await disk.flush()
            assert disk.stats()["nbd_lost_writes"] == 1
            # rewritten and flushed, all is well again
            await disk.write(0, b"y" * 4096)
            await disk.flush()
            assert await disk.read(0, 4096) == b"y" * 4096
            assert disk.stats()["nbd_reconnects"] >= 1
            await disk.aclose()


# ------------------------------------------------------------------ nbdkit

async def test_nbdkit_memory_multi_conn() -> None:
    with nbdkit_server(["memory", "32M"], tcp=True) as srv:
        with trio.fail_after(30):
            disk = await nbd_open(srv.uri, writable=True, connections=4)
            assert disk.stats()["nbd_connections"] == 4
            data = os.urandom(4 * MiB)
            await disk.write(MiB, data)
            await disk.flush()

            async def reader(k: int) -> None:
                for i in range(32):
                    off = MiB + ((k * 32 + i) * 4096) % (4 * MiB)
                    assert await disk.read(off, 4096) == data[off - MiB:off - MiB + 4096]
            async with trio.open_nursery() as n:
                for k in range(16):
                    n.start_soon(reader, k)
            await disk.aclose()


async def test_nbdkit_without_multi_conn_uses_one_connection() -> None:
    with nbdkit_server(["memory", "8M", "multi-conn-mode=disable"], ["multi-conn"]) as srv:
        with trio.fail_after(20):
            disk = await nbd_open(srv.uri, connections=4)
            assert disk.stats()["nbd_connections"] == 1
            assert await disk.read(0, 4096) == bytes(4096)
            await disk.aclose()


async def test_nbdkit_simple_replies() -> None:
    with nbdkit_server(["pattern", "16M"], structured=False) as srv:
        with trio.fail_after(20):
            disk = await nbd_open(srv.uri)
            assert disk.info is not None and not disk.info.structured
            assert await disk.read(12345, 3 * MiB) == pattern_bytes(12345, 3 * MiB)
            await disk.aclose()


async def test_nbdkit_block_size_limits_obeyed() -> None:
    """The server rejects (EINVAL) anything unaligned or above 64 KiB; we must split."""
    with nbdkit_server(["memory", "4M", "blocksize-minimum=4096", "blocksize-preferred=4096",
                        "blocksize-maximum=64K", "blocksize-error-policy=error"],
                       ["blocksize-policy"]) as srv:
        with trio.fail_after(30):
            disk = await nbd_open(srv.uri, writable=True, retries=0)
            assert (disk.min_block, disk.max_request) == (4096, 65536)
            data = os.urandom(300_001)
            await disk.write(1001, data)             # unaligned both ends, 5 pieces
            await disk.write(0, b"head")
            await disk.flush()
            assert await disk.read(0, 4) == b"head"
            assert await disk.read(1001, len(data)) == data
            assert await disk.read(4, 997) == bytes(997)
            assert disk.stats()["nbd_server_errors"] == 0
            await disk.aclose()


async def test_error_filter_reads_retried() -> None:
    with nbdkit_server(["pattern", "16M", "error-pread-rate=20%"], ["error"]) as srv:
        with trio.fail_after(60):
            disk = await nbd_open(srv.uri, retries=8)

            async def reader(k: int) -> None:
                for i in range(25):
                    off = (k * 25 + i) * 40000
                    assert await disk.read(off, 40000) == pattern_bytes(off, 40000)
            async with trio.open_nursery() as n:
                for k in range(8):
                    n.start_soon(reader, k)
            st = disk.stats()
            assert st["nbd_retries"] > 10 and st["nbd_errors"] == 0
            await disk.aclose()


async def test_error_filter_persistent_errors_reported_then_recover() -> None:
    with nbdkit_server(["pattern", "16M", "error-pread-rate=100%", "error-pread=EIO"],
                       ["error"], error_file=True) as srv:
        with trio.fail_after(30):
            disk = await nbd_open(srv.uri, retries=3)
            assert await disk.read(0, 8) == pattern_bytes(0, 8)
            srv.set_errors(True)
            t = time.monotonic()
            with pytest.raises(DiskError, match="EIO"):
                await disk.read(4096, 4096)
            assert time.monotonic() - t < 5
            st = disk.stats()
            assert (st["nbd_retries"], st["nbd_server_errors"], st["nbd_errors"]) == (3, 4, 1)
            srv.set_errors(False)
            assert await disk.read(4096, 4096) == pattern_bytes(4096, 4096)
            await disk.aclose()


async def test_delay_filter_many_in_flight() -> None:
    """16 reads at 300 ms each overlap: well under 16 x 300 ms in total."""
    with nbdkit_server(["pattern", "16M", "rdelay=300ms"], ["delay"]) as srv:
        with trio.fail_after(30):
            disk = await nbd_open(srv.uri, timeout=5, connections=1)
            t = time.monotonic()
            async with trio.open_nursery() as n:
                for k in range(16):
                    n.start_soon(disk.read, k * 65536, 65536)
            assert time.monotonic() - t < 16 * 0.3 / 2
            # a shorter timeout than the server's delay fails cleanly
            disk.timeout = 0.1
            with pytest.raises(DiskError, match="timed out"):
                await disk.read(0, 4096)
            assert disk.stats()["nbd_timeouts"] == 1
            disk.timeout = 5
            assert await disk.read(8, 8) == pattern_bytes(8, 8)
            await disk.aclose()


async def test_pause_filter_request_timeout_then_recovery() -> None:
    with nbdkit_server(["pattern", "16M"], pause=True) as srv:
        with trio.fail_after(30):
            disk = await nbd_open(srv.uri, timeout=0.5)
            assert await disk.read(0, 4096) == pattern_bytes(0, 4096)
            srv.pause()
            t = time.monotonic()
            with pytest.raises(DiskError, match="timed out"):
                await disk.read(4096, 4096)
            assert 0.4 < time.monotonic() - t < 3
            assert disk.stats()["nbd_timeouts"] == 1
            srv.resume()
            disk.timeout = 10
            assert await disk.read(8192, 4096) == pattern_bytes(8192, 4096)
            await disk.aclose()


@pytest.mark.parametrize("server", ["nbdkit", "qemu-nbd"])
async def test_server_killed_and_restarted_mid_reads(tmp_path: object, server: str) -> None:
    """Reads in flight when the server dies are resent after it comes back."""
    size = 32 * MiB
    if server == "nbdkit":
        cm = nbdkit_server(["pattern", str(size), "rdelay=20ms"], ["delay"], tcp=True)
        expect = pattern_bytes
    else:
        data = random.Random(5).randbytes(size)
        img = make_image(str(tmp_path / "d.raw"), size, data=data)  # type: ignore
        cm = qemu_nbd(img, tcp=True)

        def expect(off: int, n: int) -> bytes:
            return data[off:off + n]
    with cm as srv:
        with trio.fail_after(60):
            disk = await nbd_open(srv.uri, timeout=20)
            done = 0

            async def reader(k: int) -> None:
                nonlocal done
                r = random.Random(k)
                for _ in range(60):
                    off = r.randrange(0, size - 65536)
                    assert await disk.read(off, 65536) == expect(off, 65536)
                    done += 1
                    await trio.sleep(0.005)
            async with trio.open_nursery() as n:
                for k in range(16):
                    n.start_soon(reader, k)
                while done < 100:
                    await trio.sleep(0.01)
                srv.kill()
                await trio.sleep(0.3)
                srv.start()
                mid = done
            assert done == 16 * 60 and mid < done
            st = disk.stats()
            assert st["nbd_reconnects"] >= 1
            if server == "nbdkit":      # its 20 ms read delay guarantees reads in flight
                assert st["nbd_resent"] >= 1
            assert st["nbd_errors"] == 0
            assert disk.info is not None
            want = 4 if disk.info.multi_conn else 1
            while disk.stats()["nbd_connections"] < want:   # topped up in the background
                await trio.sleep(0.01)
            await disk.aclose()


async def test_server_gone_for_good_fails_within_timeout() -> None:
    with nbdkit_server(["pattern", "1M"]) as srv:
        with trio.fail_after(20):
            disk = await nbd_open(srv.uri, timeout=1)
            srv.kill()
            t = time.monotonic()
            with pytest.raises(DiskError, match="timed out"):
                await disk.read(0, 4096)
            assert time.monotonic() - t < 3
            await disk.aclose()


async def test_open_in_a_nursery_and_aclose_stops_everything() -> None:
    with nbdkit_server(["pattern", "1M"]) as srv:
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                disk = await NBDDisk.open(parse_uri(srv.uri), nursery=n)
                assert await disk.read(0, 16) == pattern_bytes(0, 16)
                await disk.aclose()
            # the nursery could exit: no reader task outlived aclose
            with pytest.raises(DiskError, match="closed"):
                await disk.read(0, 16)
