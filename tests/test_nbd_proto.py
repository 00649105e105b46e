"""The NBD codec and client over trio memory streams, against servers that lie.

No real server here: a scripted server speaks (or mangles) the protocol, so
that every violation can be shown to end in a clear DiskError, never a hang.
"""

from __future__ import annotations

import struct
from typing import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs.disks import DiskError, parse_uri
from memfs.disks import nbd_proto as p
from memfs.disks.nbd import NBDDisk
from memfs.disks.nbd_handshake import handshake

Server = Callable[[trio.abc.Stream], Awaitable[None]]


def opt_reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", p.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data


def info_export(size: int, flags: int = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH) -> bytes:
    return struct.pack(">HQH", p.INFO_EXPORT, size, flags)


def simple(cookie: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, rtype: int, payload: bytes, done: bool = False) -> bytes:
    return struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if done else 0,
                       rtype, cookie, len(payload)) + payload


async def serve_handshake(s: trio.abc.Stream, *, size: int = 1 << 20, structured: bool = True,
                          block: tuple[int, int, int] | None = None,
                          flags: int = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH) -> p.Reader:
    """The server half of a correct handshake; returns its reader for requests."""
    r = p.Reader(s)
    await s.send_all(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT,
                                 p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
    await r.exactly(4)
    while True:
        _, opt, n = struct.unpack(">QII", await r.exactly(16))
        await r.exactly(n)
        if opt == p.OPT_STRUCTURED_REPLY:
            await s.send_all(opt_reply(opt, p.REP_ACK if structured else p.REP_ERR_UNSUP))
        elif opt == p.OPT_GO:
            msg = b""
            if block:
                msg += opt_reply(opt, p.REP_INFO, struct.pack(">HIII", p.INFO_BLOCK_SIZE, *block))
            msg += opt_reply(opt, p.REP_INFO, info_export(size, flags)) + opt_reply(opt, p.REP_ACK)
            await s.send_all(msg)
            return r


async def next_request(r: p.Reader) -> tuple[int, int, int, int]:
    magic, _flags, cmd, cookie, offset, length = struct.unpack(">IHHQQI", await r.exactly(28))
    assert magic == p.REQUEST_MAGIC
    return cmd, cookie, offset, length


async def client_handshake(server: Server, **kw: object) -> tuple[p.ExportInfo, p.Reader]:
    c, s = trio.testing.memory_stream_pair()
    error: DiskError | None = None
    async with trio.open_nursery() as n:
        n.start_soon(server, s)
        try:
            with trio.fail_after(5):
                result = await handshake(c, "", **kw)  # type: ignore[arg-type]
        except DiskError as e:
            error = e
        n.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


# ------------------------------------------------------------------ handshake

async def test_handshake_good_with_block_sizes() -> None:
    async def server(s: trio.abc.Stream) -> None:
        await serve_handshake(s, size=12345 * 512, block=(512, 4096, 65536))
    info, _ = await client_handshake(server)
    assert (info.size, info.min_block, info.pref_block, info.max_payload) == \
        (12345 * 512, 512, 4096, 65536)
    assert info.structured and info.can_flush and not info.read_only


@pytest.mark.parametrize("hello,what", [
    (struct.pack(">QQH", 0x1122334455667788, p.IHAVEOPT, 1), "not an NBD server"),
    (struct.pack(">QQH", p.NBDMAGIC, 0xDEADBEEF, 1), "bad handshake magic"),
    (struct.pack(">QQ", p.NBDMAGIC, p.OLDSTYLE_MAGIC) + bytes(130), "oldstyle"),
    (struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 0), "fixed-newstyle"),
])
async def test_handshake_bad_hello(hello: bytes, what: str) -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(hello)
        await trio.sleep_forever()
    c, s = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(server, s)
        with trio.fail_after(5), pytest.raises(p.NBDProtocolError, match=what):
            await handshake(c, "")
        n.cancel_scope.cancel()


async def test_handshake_server_hangs_up() -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(struct.pack(">Q", p.NBDMAGIC))
        await s.aclose()
    with pytest.raises(p.NBDConnectionLost):
        await client_handshake(server)


async def test_handshake_unknown_export() -> None:
    async def server(s: trio.abc.Stream) -> None:
        r = p.Reader(s)
        await s.send_all(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3))
        await r.exactly(4)
        for _ in range(2):
            _, opt, n = struct.unpack(">QII", await r.exactly(16))
            await r.exactly(n)
            rtype = p.REP_ACK if opt == p.OPT_STRUCTURED_REPLY else p.REP_ERR + 6
            await s.send_all(opt_reply(opt, rtype, b"no such thing" if rtype != p.REP_ACK else b""))
    with pytest.raises(DiskError, match="unknown export.*no such thing"):
        await client_handshake(server)


async def test_handshake_falls_back_to_export_name() -> None:
    async def server(s: trio.abc.Stream) -> None:
        r = p.Reader(s)
        await s.send_all(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 1))   # no NO_ZEROES
        await r.exactly(4)
        for _ in range(3):
            _, opt, n = struct.unpack(">QII", await r.exactly(16))
            await r.exactly(n)
            if opt == p.OPT_EXPORT_NAME:
                await s.send_all(struct.pack(">QH", 4096, 3) + bytes(124))
                return
            await s.send_all(opt_reply(opt, p.REP_ERR_UNSUP))
    info, _ = await client_handshake(server)
    assert info.size == 4096 and not info.structured and info.read_only


async def test_handshake_wrong_option_reply_magic() -> None:
    async def server(s: trio.abc.Stream) -> None:
        r = p.Reader(s)
        await s.send_all(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3))
        await r.exactly(4)
        await r.exactly(16)
        await s.send_all(struct.pack(">QIII", 0x1234, p.OPT_STRUCTURED_REPLY, p.REP_ACK, 0))
        await trio.sleep_forever()
    c, s = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(server, s)
        with trio.fail_after(5), pytest.raises(p.NBDProtocolError, match="magic"):
            await handshake(c, "")
        n.cancel_scope.cancel()


# ------------------------------------------------------------------ replies

async def feed(data: bytes, close: bool = True) -> p.Reader:
    c, s = trio.testing.memory_stream_pair()
    await s.send_all(data)
    if close:
        await s.aclose()
    return p.Reader(c)


def read_req(offset: int, length: int) -> p.Request:
    return p.Request(p.CMD_READ, offset, length, bytearray(length))


async def test_chunks_out_of_order_with_hole() -> None:
    req = read_req(1000, 300)
    r = await feed(chunk(7, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 1200) + b"c" * 100)
                   + chunk(7, p.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 1100, 100))
                   + chunk(7, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 1000) + b"a" * 100)
                   + chunk(7, p.REPLY_TYPE_NONE, b"", done=True))
    pending = {7: req}
    dones = [await p.receive_reply(r, True, pending) for _ in range(4)]
    assert dones == [(7, False)] * 3 + [(7, True)]
    assert req.error == 0
    assert bytes(req.buf or b"") == b"a" * 100 + bytes(100) + b"c" * 100


async def test_whole_read_replies_and_the_general_path_agree() -> None:
    """A read answered by one DONE data chunk is taken in one step (issue 11);
    beside it, a read answered in pieces and one whose single chunk starts
    elsewhere than asked go the general way (the last is a lie)."""
    a, b, c, d = read_req(0, 8), read_req(8, 8), read_req(16, 8), read_req(24, 8)
    wire = (chunk(2, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 8) + b"B" * 8, True)
            + chunk(1, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"A" * 8, True)
            + chunk(3, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 20) + b"c" * 4)
            + chunk(3, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 16) + b"C" * 4, True)
            + chunk(4, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 25) + b"D" * 8, True))
    r = await feed(wire)
    pending = {1: a, 2: b, 3: c, 4: d}
    got = [await p.receive_reply(r, True, pending) for _ in range(4)]
    assert got == [(2, True), (1, True), (3, False), (3, True)]
    assert (a.buf, b.buf, c.buf) == (bytearray(b"A" * 8), bytearray(b"B" * 8),
                                     bytearray(b"CCCCcccc"))
    assert (a.chunks, b._seen) == (1, [(8, 16)])
    with pytest.raises(p.NBDProtocolError, match=r"chunk 25\+8 outside the request 24\+8"):
        await p.receive_reply(r, True, pending)


async def test_error_chunk_sets_error() -> None:
    req = read_req(0, 512)
    r = await feed(chunk(3, p.REPLY_TYPE_ERROR, struct.pack(">IH", p.EIO, 4) + b"oops", done=True))
    assert await p.receive_reply(r, True, {3: req}) == (3, True)
    assert req.error == p.EIO and req.message == "oops"


async def test_simple_reply_read_and_error() -> None:
    a, b = read_req(0, 5), read_req(5, 5)
    r = await feed(simple(2, p.EIO) + simple(1) + b"hello")
    pending = {1: a, 2: b}
    assert await p.receive_reply(r, False, pending) == (2, True)
    assert await p.receive_reply(r, False, pending) == (1, True)
    assert b.error == p.EIO and bytes(a.buf or b"") == b"hello"


@pytest.mark.parametrize("wire,structured,exc,what", ids=[
    "simple-cookie", "chunk-cookie", "simple-magic", "chunk-when-simple", "short-simple",
    "short-chunk", "outside", "short-cover", "overlap", "unknown-type", "none-not-done",
    "simple-data-when-structured", "error-msg-too-long"], argvalues=[
    (simple(99), False, p.NBDProtocolError, "unknown cookie"),
    (chunk(99, p.REPLY_TYPE_NONE, b"", True), True, p.NBDProtocolError, "unknown cookie"),
    (struct.pack(">IIQ", 0x11223344, 0, 1), False, p.NBDProtocolError, "bad reply magic"),
    (chunk(1, p.REPLY_TYPE_NONE, b"", True), False, p.NBDProtocolError, "bad reply magic"),
    (simple(1) + b"only 12 byte", False, p.NBDConnectionLost, "closed"),
    (chunk(1, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"x" * 64, True)[:-10],
     True, p.NBDConnectionLost, "closed"),
    (chunk(1, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 4000) + b"x" * 200, True),
     True, p.NBDProtocolError, "outside"),
    (chunk(1, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"x" * 100, True),
     True, p.NBDProtocolError, "short read"),
    (chunk(1, p.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 0, 4096))
     + chunk(1, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"x" * 10, True),
     True, p.NBDProtocolError, "overlaps"),
    (chunk(1, 77, b"", True), True, p.NBDProtocolError, "unknown structured reply type"),
    (chunk(1, p.REPLY_TYPE_NONE, b"", False), True, p.NBDProtocolError, "without DONE"),
    (simple(1) + bytes(4096), True, p.NBDProtocolError, "simple reply with data"),
    (chunk(1, p.REPLY_TYPE_ERROR, struct.pack(">IH", p.EIO, 50) + b"short", True),
     True, p.NBDProtocolError, "message longer"),
])
async def test_lying_replies(wire: bytes, structured: bool, exc: type, what: str) -> None:
    r = await feed(wire)
    pending = {1: read_req(0, 4096)}
    with trio.fail_after(5), pytest.raises(exc, match=what):
        while True:
            _, done = await p.receive_reply(r, structured, pending)
            if done:
                break


async def test_oversized_error_chunk_is_refused_before_its_payload() -> None:
    """A 4 GiB error chunk is a lie: refused from its header, nothing buffered."""
    r = await feed(struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 0, p.REPLY_TYPE_ERROR, 1,
                               0xFFFFFFF0) + b"E" * 100_000, close=False)
    with trio.fail_after(5), pytest.raises(p.NBDProtocolError) as e:
        await p.receive_reply(r, True, {1: read_req(0, 4096)})
    assert str(e.value) == "error chunk of 4294967280 bytes (an error chunk holds 6 to 4110)"
    assert len(r._buf) <= 100_000 and r.received <= 100_000 + 20


async def test_largest_legal_error_chunk_is_accepted() -> None:
    msg = b"m" * p.MAX_ERROR_MESSAGE
    r = await feed(chunk(1, p.REPLY_TYPE_ERROR_OFFSET,
                         struct.pack(">IH", p.EIO, len(msg)) + msg + struct.pack(">Q", 0), True))
    req = read_req(0, 4096)
    assert await p.receive_reply(r, True, {1: req}) == (1, True)
    assert req.error == p.EIO and req.message == msg.decode()


async def test_too_many_chunks_for_the_request_size() -> None:
    """One-byte data chunks: at most 4 + length/512 chunks, then the server is flooding."""
    req = read_req(0, 1024)
    wire = b"".join(chunk(1, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">QB", i, 65))
                    for i in range(7))
    r = await feed(wire)
    with pytest.raises(p.NBDProtocolError) as e:
        for _ in range(7):
            await p.receive_reply(r, True, {1: req})
    assert str(e.value) == "more than 6 reply chunks for a read of 1024 bytes"


async def test_chunks_in_order_are_merged_into_one_range() -> None:
    req = read_req(0, 4096)
    order = (1, 0, 2, 3, 5, 4, 7, 6)
    wire = b"".join(chunk(1, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", i * 512) + b"d" * 512,
                          done=(k == len(order) - 1)) for k, i in enumerate(order))
    r = await feed(wire)
    for _ in range(8):
        _, done = await p.receive_reply(r, True, {1: req})
    assert done and req._seen == [(0, 4096)] and bytes(req.buf or b"") == b"d" * 4096


_CHUNK_TYPES = [p.REPLY_TYPE_NONE, p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE,
                p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET, 77]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_CHUNK_TYPES), st.booleans(),
                          st.integers(0, 0xFFFFFFFF), st.integers(0, 8192),
                          st.integers(0, 0xFFFF), st.binary(max_size=64)), max_size=12))
def test_reply_fuzz_ends_in_a_result_or_a_disk_error(chunks: list) -> None:
    """Any chunk sequence, with lying lengths: parsed, or a DiskError; never
    another exception, and never more buffered than was sent."""
    wire = b""
    for rtype, done, length, off, mlen, tail in chunks:
        head = struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE * done,
                           rtype, 1, length)
        body = struct.pack(">QIH", off, p.EIO, mlen) + tail
        wire += head + body

    async def run() -> None:
        r = await feed(wire)
        req = read_req(1024, 4096)
        try:
            while True:
                _, fin = await p.receive_reply(r, True, {1: req})
                if fin:
                    break
        except DiskError:
            pass
        assert r.received <= len(wire)
        assert req.chunks <= req.max_chunks
    trio.run(run)


# ------------------------------------------------------------------ whole client

def lying_client(behaviour: Callable[[trio.abc.Stream, p.Reader], Awaitable[None]],
                 nursery: trio.Nursery, **hs: object) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """A connect() for NBDDisk whose every connection is served by ``behaviour``."""
    async def connect() -> trio.abc.Stream:
        c, s = trio.testing.memory_stream_pair()

        async def serve() -> None:
            try:
                r = await serve_handshake(s, **hs)  # type: ignore[arg-type]
                await behaviour(s, r)
            except (trio.BrokenResourceError, trio.ClosedResourceError, DiskError):
                pass
        nursery.start_soon(serve)
        return c
    return connect


async def open_fake(nursery: trio.Nursery, behaviour: Callable[..., Awaitable[None]],
                    **kw: object) -> NBDDisk:
    hs = kw.pop("hs", {})
    return await NBDDisk.open(parse_uri("nbd+unix:///?socket=/nonexistent"),
                              connect=lying_client(behaviour, nursery, **hs),  # type: ignore
                              **kw)  # type: ignore[arg-type]


async def test_client_wrong_cookie_is_a_clear_error() -> None:
    async def liar(s: trio.abc.Stream, r: p.Reader) -> None:
        while True:
            _, cookie, _, length = await next_request(r)
            await s.send_all(simple(cookie + 1000) + bytes(length))
    async with trio.open_nursery() as n:
        disk = await open_fake(n, liar, timeout=10, retries=2)
        with trio.fail_after(5), pytest.raises(DiskError, match="unknown cookie"):
            await disk.read(0, 4096)
        assert disk.stats()["nbd_protocol_errors"] == 3
        assert disk.stats()["nbd_errors"] == 1
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_client_short_payload_then_hangup() -> None:
    async def liar(s: trio.abc.Stream, r: p.Reader) -> None:
        _, cookie, _, length = await next_request(r)
        await s.send_all(simple(cookie) + bytes(length // 2))
        await s.aclose()
    async with trio.open_nursery() as n:
        disk = await open_fake(n, liar, timeout=1, retries=1, hs={"structured": False})
        with trio.fail_after(5), pytest.raises(DiskError, match="timed out|closed"):
            await disk.read(0, 4096)
        assert disk.stats()["nbd_resent"] >= 1
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_client_silent_server_times_out() -> None:
    async def mute(s: trio.abc.Stream, r: p.Reader) -> None:
        await trio.sleep_forever()
    async with trio.open_nursery() as n:
        disk = await open_fake(n, mute, timeout=0.3)
        with trio.fail_after(5), pytest.raises(DiskError, match="timed out"):
            await disk.read(0, 512)
        assert disk.stats()["nbd_timeouts"] == 1
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_client_out_of_order_replies_and_split() -> None:
    """Replies in reverse order, and a read above the server's maximum split in two."""
    async def reverse(s: trio.abc.Stream, r: p.Reader) -> None:
        while True:
            batch = [await next_request(r) for _ in range(2)]
            for cmd, cookie, off, length in reversed(batch):
                assert length <= 4096 and off % 512 == 0 and length % 512 == 0
                await s.send_all(chunk(cookie, p.REPLY_TYPE_OFFSET_DATA,
                                       struct.pack(">Q", off) + bytes([off // 4096 + 1]) * length,
                                       done=True))
    async with trio.open_nursery() as n:
        disk = await open_fake(n, reverse, timeout=5, hs={"block": (512, 4096, 4096)})
        assert disk.max_request == 4096
        with trio.fail_after(5):
            data = await disk.read(100, 8000)   # unaligned: 0..8192 in two requests
        assert data == b"\x01" * 3996 + b"\x02" * 4004
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_client_retries_server_errors_then_reports() -> None:
    async def failing(s: trio.abc.Stream, r: p.Reader) -> None:
        while True:
            _, cookie, _, _ = await next_request(r)
            await s.send_all(simple(cookie, p.EIO))
    async with trio.open_nursery() as n:
        disk = await open_fake(n, failing, timeout=5, retries=3, hs={"structured": False})
        with trio.fail_after(5), pytest.raises(DiskError, match="EIO"):
            await disk.read(0, 4096)
        st = disk.stats()
        assert st["nbd_retries"] == 3 and st["nbd_server_errors"] == 4 and st["nbd_errors"] == 1
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_client_einval_not_retried() -> None:
    async def failing(s: trio.abc.Stream, r: p.Reader) -> None:
        while True:
            _, cookie, _, _ = await next_request(r)
            await s.send_all(chunk(cookie, p.REPLY_TYPE_ERROR,
                                   struct.pack(">IH", p.EINVAL, 3) + b"bad", done=True))
    async with trio.open_nursery() as n:
        disk = await open_fake(n, failing, timeout=5, retries=3)
        with trio.fail_after(5), pytest.raises(DiskError, match="EINVAL: bad"):
            await disk.read(0, 4096)
        assert disk.stats()["nbd_retries"] == 0
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_client_read_only_export_refuses_writable_open() -> None:
    async def idle(s: trio.abc.Stream, r: p.Reader) -> None:
        await trio.sleep_forever()
    async with trio.open_nursery() as n:
        with pytest.raises(DiskError, match="read-only"):
            await open_fake(n, idle, writable=True,
                            hs={"flags": p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY})
        n.cancel_scope.cancel()


async def test_client_outside_disk_and_closed() -> None:
    async def idle(s: trio.abc.Stream, r: p.Reader) -> None:
        await trio.sleep_forever()
    async with trio.open_nursery() as n:
        disk = await open_fake(n, idle)
        with pytest.raises(DiskError, match="beyond the end"):
            await disk.read(disk.size - 10, 20)
        with pytest.raises(DiskError, match="read-only"):
            await disk.write(0, b"x")
        await disk.aclose()
        with pytest.raises(DiskError, match="closed"):
            await disk.read(0, 1)
        n.cancel_scope.cancel()
