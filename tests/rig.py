"""Three hosts on one machine: network namespaces for source, destination and
storage, joined by veth pairs with ``tc tbf`` rate limits.

    src ==== migration link ==== dst
      \\                          /
       storage link    storage link
            \\            /
               storage  (address STORAGE_IP on its lo, routed over both links)

There is no netem on these machines (no delay qdisc), so delay is added in
user space: :class:`DelayRelay` is a TCP relay that holds every chunk it
forwards for a fixed time, each direction.  Byte counters come from the
kernel's counters of each veth end (``ip -s -j link``), so what crossed a
link is measured, not estimated.  Everything is torn down on exit; names carry
a random tag, so two rigs never collide.

    with Rig(migration="1gbit", storage="10gbit") as rig:
        rig.run("dst", "ip", "addr")   # or rig.enter("dst") in this thread
        rig.tx_bytes("migration")
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
#: SO_MARK of the storage relay's connections, and the routing table that mark uses
STORAGE_MARK = 0x4d
STORAGE_TABLE = 77

HOSTS = ("src", "dst", "sto")
_HOST_CODE = {"src": "s", "dst": "d", "sto": "o"}
#: link name -> (host a, host b, subnet index)
LINKS = {"migration": ("src", "dst", 1), "storage-src": ("src", "sto", 2),
         "storage-dst": ("dst", "sto", 3)}


class Rig:
    """The namespaces, links and limits; ``ip(host, link)`` is a host's address on a link."""

    def __init__(self, migration: str = "1gbit", storage: str = "10gbit",
                 net: int | None = None) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.rates = {"migration": migration, "storage-src": storage, "storage-dst": storage}
        self.net = net if net is not None else 100 + int(self.tag, 16) % 100
        self.storage_ip = f"10.{self.net}.9.1"
        self.up = False
        #: the storage relay processes (delay_storage), and their one-way delay
        self.relays: list[subprocess.Popen[str]] = []
        self.storage_delay = 0.0

    def ns(self, host: str) -> str:
        return f"memfs-{self.tag}-{host}"

    def dev(self, link: str, host: str) -> str:
        code = {"migration": "m", "storage-src": "s", "storage-dst": "d"}[link]
        return f"m{self.tag}{code}{_HOST_CODE[host]}"

    def ip(self, host: str, link: str) -> str:
        a, b, k = LINKS[link]
        return f"10.{self.net}.{k}.{1 if host == a else 2}"

    # ------------------------------------------------------------------ life

    def __enter__(self) -> "Rig":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sh(self, *argv: str) -> str:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if res.returncode:
            raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")
        return res.stdout

    def _build(self) -> None:
        for h in HOSTS:
            self._sh("ip", "netns", "add", self.ns(h))
            self._sh("ip", "-n", self.ns(h), "link", "set", "lo", "up")
        self.up = True
        self._sh("ip", "-n", self.ns("sto"), "addr", "add", f"{self.storage_ip}/32", "dev", "lo")
        for link, (a, b, _) in LINKS.items():
            da, db = self.dev(link, a), self.dev(link, b)
            self._sh("ip", "link", "add", da, "type", "veth", "peer", "name", db)
            for host, dev in ((a, da), (b, db)):
                self._sh("ip", "link", "set", dev, "netns", self.ns(host))
                self._sh("ip", "-n", self.ns(host), "addr", "add",
                         f"{self.ip(host, link)}/24", "dev", dev)
                self._sh("ip", "-n", self.ns(host), "link", "set", dev, "up")
                # egress limit on each end: the link carries `rate` each way
                self._sh("tc", "-n", self.ns(host), "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", self.rates[link], "burst", "1mb", "latency", "100ms")
        for host, link in (("src", "storage-src"), ("dst", "storage-dst")):
            self._sh("ip", "-n", self.ns(host), "route", "add", f"{self.storage_ip}/32", "via",
                     self.ip("sto", link))

    def close(self) -> None:
        for proc in self.relays:
            proc.kill()
            proc.wait()
        self.relays.clear()
        if not self.up:
            return
        for h in HOSTS:   # the veth pairs go with their namespaces
            subprocess.run(["ip", "netns", "del", self.ns(h)], capture_output=True)
        self.up = False

    # ------------------------------------------------------------------ use

    def prefix(self, host: str) -> list[str]:
        """argv prefix that runs a command on ``host`` (network namespace only:
        the mount namespace stays the host's, so FUSE mounts are seen by all)."""
        return ["nsenter", f"--net=/run/netns/{self.ns(host)}"]

    def run(self, host: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix(host) + list(argv), **kw)

    def enter(self, host: str) -> None:
        """Move the calling thread (and the processes and threads it starts
        from now on) into ``host``'s network namespace."""
        fd = os.open(f"/run/netns/{self.ns(host)}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns {self.ns(host)}: {os.strerror(e)}")
        finally:
            os.close(fd)

    def in_ns(self, host: str, fn: Callable[[], T]) -> T:
        """``fn()`` run in a new thread inside ``host``'s network namespace
        (sockets it makes live there; threads it starts stay there)."""
        box: list[Any] = []

        def body() -> None:
            try:
                self.enter(host)
                box.append((True, fn()))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
        t = threading.Thread(target=body, daemon=True)
        t.start()
        t.join()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def tx_bytes(self, link: str) -> dict[str, int]:
        """Bytes each end of ``link`` has sent so far (kernel counters)."""
        out = {}
        for host in LINKS[link][:2]:
            doc = json.loads(self._sh("ip", "-n", self.ns(host), "-s", "-j", "link", "show",
                                      "dev", self.dev(link, host)))
            out[host] = int(doc[0]["stats64"]["tx"]["bytes"])
        return out

    def delay_storage(self, ports: Iterable[int], delay: float) -> None:
        """Add ``delay`` seconds each way to TCP connections from the source and
        destination hosts to the storage address on ``ports``.

        Ceph clients connect to the addresses the cluster's maps name, so the
        relay cannot be a different address: on each client host the storage
        address becomes local too (on ``lo``), where a :class:`DelayRelay`
        process listens on ``ports``; its own connections carry SO_MARK
        ``STORAGE_MARK``, which a policy rule ahead of the local table routes
        out over that host's storage link to the real storage host.  Replies
        come from an address that is local here as well, hence
        ``accept_local``.  Bytes still cross the same veth (counted, rate
        limited); the relay process is stopped by :meth:`close`."""
        ports = sorted(set(ports))
        for host, link in (("src", "storage-src"), ("dst", "storage-dst")):
            ns, dev = self.ns(host), self.dev(link, host)
            self._sh("ip", "-n", ns, "addr", "add", f"{self.storage_ip}/32", "dev", "lo")
            self._sh("ip", "-n", ns, "rule", "add", "pref", "100", "fwmark",
                     hex(STORAGE_MARK), "lookup", str(STORAGE_TABLE))
            self._sh("ip", "-n", ns, "rule", "add", "pref", "200", "lookup", "local")
            self._sh("ip", "-n", ns, "rule", "del", "pref", "0")
            self._sh("ip", "-n", ns, "route", "add", f"{self.storage_ip}/32", "via",
                     self.ip("sto", link), "src", self.ip(host, link), "table",
                     str(STORAGE_TABLE))
            for conf in ("all", dev):
                self._sh(*self.prefix(host), "sysctl", "-qw",
                         f"net.ipv4.conf.{conf}.accept_local=1",
                         f"net.ipv4.conf.{conf}.rp_filter=0")
            proc = subprocess.Popen(
                [*self.prefix(host), sys.executable, os.path.abspath(__file__), "relay",
                 self.storage_ip, str(delay), str(STORAGE_MARK), *map(str, ports)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                preexec_fn=_die_with_parent)
            self.relays.append(proc)
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(f"the storage relay on {host} did not start: {line!r}")
        self.storage_delay = delay

    def qdisc(self, link: str, host: str) -> str:
        return self._sh("tc", "-n", self.ns(host), "qdisc", "show", "dev",
                        self.dev(link, host)).strip()


class DelayRelay:
    """A TCP relay that holds every chunk ``delay`` seconds before passing it
    on (each direction): the link's latency, in user space.  Listens on
    ``listen`` in the calling thread's network namespace and connects to
    ``target`` from there.  One thread per direction per connection."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int] | str,
                 delay: float, mark: int = 0) -> None:
        self.target = target
        self.delay = delay
        #: SO_MARK of the outgoing connections (the storage relay's policy route)
        self.mark = mark
        self.sock = socket.create_server(listen, reuse_port=False)
        self.addr = self.sock.getsockname()
        self.bytes = 0
        self._stop = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait
            try:
                if isinstance(self.target, str):      # a unix socket path
                    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    b.connect(self.target)
                else:
                    b = _connect(self.target, self.mark)
            except OSError:
                a.close()
                continue
            b.settimeout(None)
            for x, y in ((a, b), (b, a)):
                t = threading.Thread(target=self._pipe, args=(x, y), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        """Read as it comes; send each chunk once it is ``delay`` old (a queue
        between a reader and this sender keeps the link full meanwhile)."""
        import collections
        q: collections.deque[tuple[float, bytes]] = collections.deque()
        cond = threading.Condition()
        done = [False]

        def reader() -> None:
            try:
                while chunk := src.recv(1 << 16):
                    with cond:
                        q.append((time.monotonic() + self.delay, chunk))
                        cond.notify()
            except OSError:
                pass
            with cond:
                done[0] = True
                cond.notify()
        threading.Thread(target=reader, daemon=True).start()
        try:
            while True:
                with cond:
                    while not q and not done[0]:
                        cond.wait()
                    if not q:
                        break
                    due, chunk = q.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(chunk)
                self.bytes += len(chunk)
        except OSError:
            pass
        finally:
            _half_close(dst)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class LinkHop:
    """A unix socket on this machine whose connections cross a rig link: a
    client connecting to ``listen`` reaches ``target`` (a unix socket) through
    a TCP connection made on host ``a`` to a :class:`DelayRelay` on host
    ``b``.  For programs that speak only through unix sockets (QEMU's
    migration stream here): their bytes then pay the link's rate, its
    user-space delay, and show in its counters."""

    def __init__(self, rig: Rig, listen: str, target: str, delay: float = 0.0,
                 link: str = "migration") -> None:
        self.rig = rig
        a, b, _ = LINKS[link]
        self.a, self.link = a, link
        self.relay = rig.in_ns(b, lambda: DelayRelay((rig.ip(b, link), 0), target, delay))
        self.remote = (rig.ip(b, link), self.relay.addr[1])
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(listen)
        self.sock.listen(4)
        self.listen = listen
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                out = self.rig.in_ns(self.a, lambda: socket.create_connection(self.remote, 10))
            except OSError:
                c.close()
                continue
            out.settimeout(None)
            for x, y in ((c, out), (out, c)):
                threading.Thread(target=_copy, args=(x, y), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        self.relay.close()


def _connect(target: tuple[str, int], mark: int) -> socket.socket:
    """A TCP connection to ``target``; with ``mark``, SO_MARK set before the
    connect, so the policy route of that mark picks the way out."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.settimeout(10)
        s.connect(target)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        s.close()
        raise
    return s


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(1 << 16):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        _half_close(dst)


def _half_close(dst: socket.socket) -> None:
    """The sending side is done: the peer reads EOF, its replies may still come."""
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _relay_main(argv: list[str]) -> None:
    """``rig.py relay ADDR DELAY MARK PORT...``: a :class:`DelayRelay` per port,
    listening on ADDR here and connecting to ADDR:PORT with MARK; prints
    ``ready`` once every port listens.  A process of its own, so that its
    threads do not share a GIL with the benchmark's."""
    addr, delay, mark, *ports = argv
    relays = [DelayRelay((addr, int(p)), (addr, int(p)), float(delay), int(mark))
              for p in ports]
    print("ready", flush=True)
    while relays:
        signal.pause()      # until killed (Rig.close, or the parent's death)


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    _relay_main(sys.argv[2:])
