"""The three-host rig (tests/rig.py): namespaces, rate-limited links, the
user-space delay relay and the link byte counters, with real sockets."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

from rig import DelayRelay, Rig

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "nsenter")),
    reason="the rig needs root, ip, tc and nsenter")


def _in(rig: Rig, host: str, fn, *args) -> threading.Thread:
    """Run ``fn`` in a thread that lives in ``host``'s network namespace."""
    def body() -> None:
        rig.enter(host)
        fn(*args)
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def test_links_relay_and_counters() -> None:
    with Rig(migration="200mbit", storage="1gbit") as rig:
        assert "tbf" in rig.qdisc("migration", "src") and "rate 200Mbit" in \
            rig.qdisc("migration", "src")
        assert "rate 1Gbit" in rig.qdisc("storage-dst", "sto")
        payload = os.urandom(4 << 20)
        got: dict[str, object] = {}
        ready = threading.Event()

        def dst_side() -> None:
            srv = socket.create_server(("127.0.0.1", 0))
            relay = DelayRelay((rig.ip("dst", "migration"), 0), srv.getsockname(), 0.02)
            got["port"] = relay.addr[1]
            ready.set()
            c, _ = srv.accept()
            buf = bytearray()
            while chunk := c.recv(1 << 16):
                buf += chunk
            got["data"] = bytes(buf)
            c.sendall(b"ok")
            c.close()
            got["relayed"] = relay
            srv.close()

        def src_side() -> None:
            s = socket.create_connection((rig.ip("dst", "migration"), got["port"]))
            t = time.monotonic()
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got["ack"] = s.recv(2)
            got["seconds"] = time.monotonic() - t
            s.close()

        d = _in(rig, "dst", dst_side)
        assert ready.wait(10)
        before = rig.tx_bytes("migration")
        _in(rig, "src", src_side).join(60)
        d.join(60)
        after = rig.tx_bytes("migration")
        assert got["data"] == payload and got["ack"] == b"ok"
        # the payload crossed the link from src, through the kernel's counters
        assert after["src"] - before["src"] >= len(payload)
        # the relay held both directions: the ack came at least 2 x 20 ms later
        assert got["seconds"] >= 0.04
        mbit = len(payload) * 8 / got["seconds"] / 1e6
        print(f"\n4 MiB over the 200 Mbit/s link and a 20 ms relay: {mbit:.0f} Mbit/s; "
              f"src sent {after['src'] - before['src']} bytes")
        got["relayed"].close()


def test_storage_address_is_reached_from_both_sides() -> None:
    with Rig() as rig:
        ready = threading.Event()
        seen: list[str] = []

        def sto_side() -> None:
            srv = socket.create_server((rig.storage_ip, 7000))
            ready.set()
            for _ in range(2):
                c, peer = srv.accept()
                seen.append(peer[0])
                c.close()
            srv.close()
        t = _in(rig, "sto", sto_side)
        assert ready.wait(10)
        for host in ("src", "dst"):
            _in(rig, host, lambda: socket.create_connection((rig.storage_ip, 7000)).close()
                ).join(10)
        t.join(10)
        assert sorted(seen) == sorted([rig.ip("src", "storage-src"),
                                       rig.ip("dst", "storage-dst")])
        # and not over the migration link: nothing routes src -> sto through dst
        res = rig.run("src", "ip", "route", "get", rig.storage_ip, capture_output=True,
                      text=True)
        assert rig.dev("storage-src", "src") in res.stdout


def test_link_hop_carries_a_unix_stream_over_the_link(tmp_path) -> None:
    """What QEMU's migration stream does on the rig: unix socket in, across the
    migration link, unix socket out; bytes identical and counted on the link."""
    from rig import LinkHop
    with Rig(migration="500mbit") as rig:
        target = str(tmp_path / "incoming.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(target)
        srv.listen(1)
        hop = LinkHop(rig, str(tmp_path / "hop.sock"), target, delay=0.001)
        payload = os.urandom(2 << 20)
        got = bytearray()

        def serve() -> None:
            c, _ = srv.accept()
            while chunk := c.recv(1 << 16):
                got.extend(chunk)
            c.close()
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        before = rig.tx_bytes("migration")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(hop.listen)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        t.join(30)
        s.close()
        after = rig.tx_bytes("migration")
        hop.close()
        srv.close()
        assert bytes(got) == payload
        assert after["src"] - before["src"] >= len(payload)


def test_storage_delay_relay_keeps_the_address_and_the_link() -> None:
    """delay_storage: a client still connects to the storage address (as a Ceph
    client does to the address its maps name) and reaches the server on the
    storage host through its own storage link, bytes identical and counted on
    that veth, each round trip held at least twice the delay."""
    delay = 0.01
    with Rig(storage="1gbit") as rig:
        ready = threading.Event()
        peers: list[str] = []

        def sto_side() -> None:
            srv = socket.create_server((rig.storage_ip, 6800))
            ready.set()
            for _ in range(2):
                c, peer = srv.accept()
                peers.append(peer[0])
                while chunk := c.recv(1 << 16):
                    c.sendall(chunk)
                c.close()
            srv.close()
        t = _in(rig, "sto", sto_side)
        assert ready.wait(10)
        rig.delay_storage([6800, 6801], delay)
        payload = os.urandom(1 << 20)
        for host, link in (("src", "storage-src"), ("dst", "storage-dst")):
            def client() -> tuple[bytes, list[float]]:
                s = socket.create_connection((rig.storage_ip, 6800), timeout=30)
                rtts = []
                for _ in range(3):
                    t0 = time.monotonic()
                    s.sendall(b"ping")
                    assert s.recv(4) == b"ping"
                    rtts.append(time.monotonic() - t0)
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                back = bytearray()
                while chunk := s.recv(1 << 16):
                    back += chunk
                s.close()
                return bytes(back), rtts
            before = rig.tx_bytes(link)
            back, rtts = rig.in_ns(host, client)
            after = rig.tx_bytes(link)
            assert back == payload
            assert min(rtts) >= 2 * delay
            assert after[host] - before[host] >= len(payload)
            assert after["sto"] - before["sto"] >= len(payload)
            print(f"\n{host}: round trips through the {delay * 1000:g} ms storage relay "
                  f"{[round(r * 1000, 2) for r in rtts]} ms")
        t.join(10)
        # the server saw each client's own storage-link address
        assert peers == [rig.ip("src", "storage-src"), rig.ip("dst", "storage-dst")]
        relays = list(rig.relays)
        assert len(relays) == 2
    assert all(p.poll() is not None for p in relays)   # close stopped them
