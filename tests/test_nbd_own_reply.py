"""A caller alone on its NBD connection reads its own reply (issue 11).

Over real sockets (socket pairs, a scripted server that lies or stalls):
the one-step take of a whole reply must agree with the reader's general
parse on any bytes, and every way a reply can go wrong (an error chunk, a
split or short reply, a wrong cookie, a hang-up, a stall past the deadline)
must end as it does through the reader task: the same bytes, the same
error text, the same retries.
"""

from __future__ import annotations

import socket
import struct
from typing import Awaitable, Callable

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs.disks import DiskError, parse_uri
from memfs.disks import nbd_proto as p
from memfs.disks.nbd import NBDDisk
from memfs.disks.nbd_sock import TOOK, SocketReader

from test_nbd_proto import chunk, feed, next_request, read_req, serve_handshake, simple

pytestmark = pytest.mark.nbd

Behaviour = Callable[[trio.SocketStream, p.Reader], Awaitable[None]]


def data_chunk(cookie: int, off: int, payload: bytes, done: bool = True) -> bytes:
    return chunk(cookie, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", off) + payload, done)


def pattern(off: int, n: int) -> bytes:
    """The fake export's bytes: each 4 KiB block holds its number."""
    return b"".join(struct.pack(">I", (off + i) // 4096 & 0xFFFFFFFF)[(off + i) % 4]
                    .to_bytes(1, "big") for i in range(n))


async def general(r: p.Reader, structured: bool, cookie: int,
                  req: p.Request) -> tuple[object, ...]:
    """The reader's parse to the end of ``req``: its outcome, or the error."""
    try:
        while True:
            got, done = await p.receive_reply(r, structured, {cookie: req})
            if done and got == cookie:
                return ("done", bytes(req.buf or b""), req.error, req.message)
    except DiskError as e:
        return (type(e).__name__, str(e))


async def via_socket(wire: bytes, structured: bool, off: int, n: int) -> tuple[object, ...]:
    """``wire`` sent on a socket pair and half-closed; the caller's take
    first, then (unless it took the reply) the reader's parse."""
    a, b = trio.socket.socketpair()
    with a, b:
        await b.send(wire)
        b.shutdown(socket.SHUT_WR)
        r = SocketReader(trio.SocketStream(a), a)
        req = read_req(off, n)
        if r.take_reply(1, req, structured) == TOOK:
            return ("done", bytes(req.buf or b""), 0, "")
        return await general(r, structured, 1, req)


def wires() -> st.SearchStrategy[tuple[bytes, bool]]:
    """Replies to a read of 64 bytes at 4096, cookie 1: right, wrong in one
    field, in pieces, errors, cut short, with bytes after them."""
    good = data_chunk(1, 4096, bytes(range(64)))
    pieces = st.sampled_from([
        good, data_chunk(2, 4096, bytes(64)), data_chunk(1, 4097, bytes(64)),
        data_chunk(1, 4096, bytes(63)), data_chunk(1, 4096, bytes(65)),
        data_chunk(1, 4096, bytes(64), done=False) + chunk(1, p.REPLY_TYPE_NONE, b"", True),
        data_chunk(1, 4096, b"a" * 32, done=False) + data_chunk(1, 4128, b"b" * 32),
        chunk(1, p.REPLY_TYPE_ERROR, struct.pack(">IH", p.EIO, 4) + b"oops", True),
        chunk(1, p.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 4096, 64), True),
        simple(1) + bytes(64), simple(1, p.EIO), simple(9) + bytes(64)])
    return st.tuples(pieces, st.integers(0, 200), st.binary(max_size=40), st.booleans()).map(
        lambda t: ((t[0][:t[1]] if t[1] < len(t[0]) else t[0]) + t[2], t[3]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wires())
def test_own_take_agrees_with_the_general_parse(case: tuple[bytes, bool]) -> None:
    """Any reply bytes: the caller's one-step take (then the reader, for
    what it leaves) ends exactly as the reader's parse alone does."""
    wire, structured = case

    async def run() -> None:
        ref = await general(await feed(wire), structured, 1, read_req(4096, 64))
        assert await via_socket(wire, structured, 4096, 64) == ref
    trio.run(run)


# ------------------------------------------------------------------ whole client

async def open_socket_fake(nursery: trio.Nursery, behaviour: Behaviour,
                           **kw: object) -> NBDDisk:
    """An NBDDisk whose every connection is a socket pair served by ``behaviour``."""
    hs = kw.pop("hs", {})

    async def connect() -> trio.abc.Stream:
        a, b = trio.socket.socketpair()
        client, server = trio.SocketStream(a), trio.SocketStream(b)

        async def serve() -> None:
            try:
                r = await serve_handshake(server, **hs)  # type: ignore[arg-type]
                await behaviour(server, r)
            except (trio.BrokenResourceError, trio.ClosedResourceError, DiskError):
                pass
            finally:
                await server.aclose()
        nursery.start_soon(serve)
        return client
    return await NBDDisk.open(parse_uri("nbd+unix:///?socket=/nonexistent"),
                              connect=connect, **kw)  # type: ignore[arg-type]


async def answer(s: trio.SocketStream, cookie: int, off: int, n: int) -> None:
    await s.send_all(data_chunk(cookie, off, pattern(off, n)))


def first_connection(before: Callable[[], Awaitable[bool]]) -> Behaviour:
    """A server that answers every request, but on its first connection
    awaits ``before()`` first and hangs up instead when it returns True."""
    calls = 0

    async def server(s: trio.SocketStream, r: p.Reader) -> None:
        nonlocal calls
        calls += 1
        first = calls == 1
        while True:
            _, cookie, off, n = await next_request(r)
            if first and await before():
                return  # the connection closes (serve's finally)
            await answer(s, cookie, off, n)
    return server


async def test_own_replies_and_replies_in_two_parts() -> None:
    """Whole replies are taken by their callers; a reply sent in two parts
    (the caller finds half) is finished by the reader: same bytes."""
    async def server(s: trio.SocketStream, r: p.Reader) -> None:
        k = 0
        while True:
            _, cookie, off, n = await next_request(r)
            k += 1
            wire = data_chunk(cookie, off, pattern(off, n))
            if k % 2:
                await s.send_all(wire)
            else:
                await s.send_all(wire[:len(wire) // 2])
                await trio.sleep(0.02)
                await s.send_all(wire[len(wire) // 2:])
    async with trio.open_nursery() as n:
        disk = await open_socket_fake(n, server, connections=1, timeout=10)
        (conn,) = disk._pool.conns
        with trio.fail_after(10):
            for i in range(20):
                assert await disk.read(i * 8192, 4096) == pattern(i * 8192, 4096)
        assert conn.own_replies == 10 and not conn.pending and not conn.owner
        assert disk.stats()["nbd_errors"] == 0
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_own_reply_error_chunk_is_retried_with_its_message(caplog) -> None:
    """An error chunk (the caller's take sees no data reply): retried, then
    the exact error after the retries."""
    async def server(s: trio.SocketStream, r: p.Reader) -> None:
        while True:
            _, cookie, _, _ = await next_request(r)
            await s.send_all(chunk(cookie, p.REPLY_TYPE_ERROR,
                                   struct.pack(">IH", p.EIO, 4) + b"oops", True))
    async with trio.open_nursery() as n:
        disk = await open_socket_fake(n, server, connections=1, timeout=10, retries=2)
        with trio.fail_after(10), pytest.raises(DiskError) as e:
            await disk.read(0, 4096)
        assert str(e.value) == ("nbd+unix:///?socket=/nonexistent: read of 4096 bytes at 0 "
                                "failed: server error EIO: oops")
        st = disk.stats()
        assert (st["nbd_server_errors"], st["nbd_retries"], st["nbd_errors"]) == (3, 2, 1)
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_own_reply_wrong_cookie_is_a_protocol_error() -> None:
    """A reply to a cookie never sent: the connection is dropped as a liar
    (lied=True: counted against the retries), every time."""
    async def liar(s: trio.SocketStream, r: p.Reader) -> None:
        while True:
            _, cookie, off, n = await next_request(r)
            await answer(s, cookie + 1000, off, n)
    async with trio.open_nursery() as n:
        disk = await open_socket_fake(n, liar, connections=1, timeout=10, retries=2)
        with trio.fail_after(10), pytest.raises(DiskError) as e:
            await disk.read(0, 4096)
        assert str(e.value).endswith("read of 4096 bytes at 0 failed: reply for unknown "
                                     "cookie 0x3eb")
        assert disk.stats()["nbd_protocol_errors"] == 3
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_hang_up_under_the_caller_then_resent() -> None:
    """The server hangs up while the caller waits for its reply: the read
    is resent on a new connection and returns the right bytes."""
    async def hang_up() -> bool:
        await trio.sleep(0.02)
        return True
    async with trio.open_nursery() as n:
        disk = await open_socket_fake(n, first_connection(hang_up), connections=1, timeout=10)
        with trio.fail_after(10):
            assert await disk.read(40960, 4096) == pattern(40960, 4096)
        st = disk.stats()
        assert st["nbd_resent"] == 1 and st["nbd_reconnects"] == 1 and st["nbd_errors"] == 0
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_hang_up_while_idle_is_noticed_without_a_request() -> None:
    """A server that hangs up while nothing is in flight: the reader task,
    waiting aside for just that, drops the connection at once."""
    async def server(s: trio.SocketStream, r: p.Reader) -> None:
        _, cookie, off, n = await next_request(r)
        await answer(s, cookie, off, n)
        await trio.sleep(0.05)   # then hang up, idle
    async with trio.open_nursery() as n:
        disk = await open_socket_fake(n, server, connections=1, timeout=10)
        (conn,) = disk._pool.conns
        with trio.fail_after(10):
            assert await disk.read(0, 4096) == pattern(0, 4096)
            assert conn.own_replies == 1
            while conn.alive:
                await trio.sleep(0.01)
        assert conn.death == "server closed the connection"
        assert disk.stats()["nbd_connections"] == 0
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_deadline_passes_while_the_caller_waits_then_all_is_well() -> None:
    """A reply later than the caller's deadline: the read fails at the
    deadline with the timeout text; the silent connection is dropped and
    the next read, on a new one, is right."""
    async def late() -> bool:
        await trio.sleep(0.5)
        return False
    async with trio.open_nursery() as n:
        disk = await open_socket_fake(n, first_connection(late), connections=1, timeout=10)
        with trio.fail_after(10):
            with pytest.raises(DiskError) as e:
                await disk.read(0, 4096, deadline=trio.current_time() + 0.1)
            assert "read of 4096 bytes at 0 failed: timed out after 0.1 s (no reply from " \
                   "the server)" in str(e.value)
            assert await disk.read(4096, 4096) == pattern(4096, 4096)
        assert disk.stats()["nbd_timeouts"] == 1
        await disk.aclose()
        n.cancel_scope.cancel()


async def test_others_sent_while_a_caller_owns_the_socket() -> None:
    """Requests sent while one caller reads its own reply go through the
    reader task, in any reply order: every one gets its bytes."""
    async def server(s: trio.SocketStream, r: p.Reader) -> None:
        while True:
            batch = [await next_request(r) for _ in range(4)]
            for _, cookie, off, n in reversed(batch):
                await answer(s, cookie, off, n)
    async with trio.open_nursery() as n:
        disk = await open_socket_fake(n, server, connections=1, timeout=10)
        (conn,) = disk._pool.conns
        got: dict[int, bytes] = {}

        async def one(off: int) -> None:
            got[off] = await disk.read(off, 4096)
        with trio.fail_after(10):
            for _ in range(3):
                async with trio.open_nursery() as m:
                    for k in range(4):
                        m.start_soon(one, k * 4096 * 7)
        assert got == {off: pattern(off, 4096) for off in got} and len(got) == 4
        assert not conn.pending and not conn.owner and conn.alive
        assert disk.stats()["nbd_errors"] == 0
        await disk.aclose()
        n.cancel_scope.cancel()
