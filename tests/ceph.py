"""A real single-host Ceph cluster for tests, bootstrapped by hand from Debian's packages.

One monitor and one OSD (bluestore on a sparse file, so that a killed and
restarted OSD comes back with its data; memstore would silently roll back),
no manager (RBD works without it), pool size 1, cephx on, everything on
127.0.0.1 with ports nobody else uses.  No systemd, no cephadm: monmaptool,
ceph-authtool, ``ceph-mon --mkfs``, ``ceph osd new``, ``ceph-osd --mkfs``.
Every daemon runs in the foreground as our child with PR_SET_PDEATHSIG, so
a dying test runner takes the cluster with it.

    with ceph_cluster() as c:
        c.create_image("img", 64 << 20); c.uri("img"); c.kill_osd(); c.start_osd()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from nbdserver import _die_with_parent, free_port

#: the packages tools/setup --test installs for these tests
PACKAGES = ("ceph-mon", "ceph-osd", "ceph-common", "python3-rbd", "python3-rados")
BINARIES = ("ceph-mon", "ceph-osd", "ceph", "rbd", "ceph-authtool", "monmaptool")
START_TIMEOUT = 90.0


def missing() -> str:
    """Why a cluster cannot run here ("" if it can)."""
    gone = [b for b in BINARIES if not shutil.which(b)]
    if gone:
        return (f"Ceph is not installed ({', '.join(gone)} missing; tools/setup --test "
                f"installs {' '.join(PACKAGES)})")
    if os.geteuid() != 0:
        return "the Ceph daemons run as root here"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError as e:
        return (f"the librbd Python bindings cannot be imported ({e}); tools/setup --test "
                "links Debian's python3-rbd into a venv of the same Python version")
    return ""


class CephCluster:
    """One mon, one OSD, pool ``rbd``; the conf and admin keyring live in ``dir``."""

    pool = "rbd"

    def __init__(self, base: str, addr: str = "127.0.0.1", prefix: tuple[str, ...] = (),
                 mon_port: int | None = None, osd_ports: tuple[int, int] | None = None) -> None:
        self.dir = base
        #: where the daemons listen, and the argv prefix that runs them (and
        #: this class's tools) on their host (tests/rig.py: the storage namespace)
        self.addr = addr
        self.prefix = list(prefix)
        self.conf = os.path.join(base, "ceph.conf")
        self.keyring = os.path.join(base, "admin.keyring")
        self.fsid = str(uuid.uuid4())
        self.mon_port = mon_port or free_port()
        #: the OSD binds its messengers in this range (ms bind port min/max), so
        #: that a relay can listen on every port a client may be sent to
        self.osd_ports = osd_ports
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.osd_uuid = str(uuid.uuid4())
        #: seconds each step of the bootstrap took, for the report
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- plumbing

    def run(self, *argv: str, input: bytes | None = None, timeout: float = 60) -> str:
        """A Ceph command-line tool against this cluster; its stdout, or AssertionError."""
        res = subprocess.run([*self.prefix, argv[0], "-c", self.conf, *argv[1:]], input=input,
                             capture_output=True, timeout=timeout)
        if res.returncode:
            raise AssertionError(f"{' '.join(argv)}: exit {res.returncode}: "
                                 f"{res.stderr.decode(errors='replace').strip()}")
        return res.stdout.decode()

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.dir, f"{name}.out"), "ab")
        try:
            self.procs[name] = subprocess.Popen(self.prefix + argv + ["-f", "-c", self.conf],
                                                stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=log, preexec_fn=_die_with_parent)
        finally:
            log.close()

    def _write_conf(self) -> None:
        d = self.dir
        lo, hi = self.osd_ports or (0, 0)
        ports = f"ms bind port min = {lo}\nms bind port max = {hi}\n" if self.osd_ports else ""
        with open(self.conf, "w") as f:
            f.write(f"""[global]
fsid = {self.fsid}
mon host = v2:{self.addr}:{self.mon_port}
mon initial members = a
public addr = {self.addr}
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.keyring}
run dir = {d}/run
log file = {d}/log/$name.log
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
[mon]
mon data = {d}/mon/$cluster-$id
[osd]
{ports}osd data = {d}/osd/$cluster-$id
keyring = {d}/osd/$cluster-$id/keyring
osd objectstore = bluestore
bluestore block path = {d}/osd/block
bluestore block create = true
bluestore block size = 4294967296
bluestore fsck on mount = false
osd memory target = 939524096
[client]
admin socket = {d}/run/$name.$pid.asok
log file = {d}/log/client.$pid.log
""")

    # ---------------------------------------------------------------- life

    def bootstrap(self) -> None:
        d = self.dir
        for sub in ("run", "log", "crash", "mon", "osd/ceph-0"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        self._write_conf()
        t = time.monotonic()
        mon_kr = os.path.join(d, "mon.keyring")
        self._tool("ceph-authtool", "--create-keyring", mon_kr, "--gen-key", "-n", "mon.",
                   "--cap", "mon", "allow *")
        self._tool("ceph-authtool", "--create-keyring", self.keyring, "--gen-key", "-n",
                   "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                   "--cap", "mgr", "allow *")
        self._tool("ceph-authtool", mon_kr, "--import-keyring", self.keyring)
        monmap = os.path.join(d, "monmap")
        self._tool("monmaptool", "--create", "--addv", "a",
                   f"[v2:{self.addr}:{self.mon_port}]", "--fsid", self.fsid, monmap)
        self._tool("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap,
                   "--keyring", mon_kr)
        self._daemon("mon", ["ceph-mon", "-i", "a"])
        self.timings["mon"] = time.monotonic() - t
        t = time.monotonic()
        osd_id = self.run("ceph", "osd", "new", self.osd_uuid).strip()
        assert osd_id == "0", osd_id
        osd_kr = os.path.join(d, "osd/ceph-0/keyring")
        self._tool("ceph-authtool", "--create-keyring", osd_kr, "--gen-key", "-n", "osd.0")
        self.run("ceph", "auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd",
                 "mgr", "allow profile osd", "-i", osd_kr)
        self._tool("ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid",
                   self.osd_uuid)
        self.start_osd()
        self.timings["osd"] = time.monotonic() - t
        t = time.monotonic()
        self.run("ceph", "osd", "pool", "create", self.pool, "8")
        self.run("ceph", "osd", "pool", "application", "enable", self.pool, "rbd")
        self.wait_active()
        self.timings["pool"] = time.monotonic() - t

    def _tool(self, *argv: str) -> None:
        res = subprocess.run([*self.prefix, *argv], capture_output=True, timeout=120)
        if res.returncode:
            raise AssertionError(f"{' '.join(argv)}: exit {res.returncode}: "
                                 f"{res.stderr.decode(errors='replace').strip()}")

    def start_osd(self) -> None:
        self._daemon("osd", ["ceph-osd", "-i", "0"])

    def kill_osd(self, sig: int = signal.SIGKILL) -> None:
        """Kill the OSD (SIGKILL: no clean shutdown) and reap it."""
        p = self.procs.pop("osd")
        p.send_signal(sig)
        p.wait(30)

    def osd_up(self) -> bool:
        dump = json.loads(self.run("ceph", "osd", "dump", "-f", "json"))
        return any(o["osd"] == 0 and o["up"] for o in dump["osds"])

    def wait_active(self, timeout: float = START_TIMEOUT) -> None:
        """Until the OSD is up and an object write to the pool succeeds (the pool's
        PGs are active).  No mgr, so no ``ceph pg stat``: ask the data path itself."""
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"ceph {name} exited with {p.returncode}; "
                                         f"see {self.dir}/log")
            try:
                if self.osd_up():
                    self.run("rados", "-p", self.pool, "put", "memfs-probe", self.conf,
                             timeout=max(1, min(30, end - time.monotonic())))
                    return
                last = "osd.0 is not up"
            except (AssertionError, ValueError, subprocess.TimeoutExpired) as e:
                last = str(e)
            time.sleep(0.3)
        raise AssertionError(f"ceph pool not usable after {timeout:g} s: {last}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def client_ports(self) -> list[int]:
        """Every port a client of this cluster may connect to (the monitor's
        and the OSD's range; needs ``osd_ports``)."""
        assert self.osd_ports is not None, "the OSD's ports are not fixed"
        return [self.mon_port, *range(self.osd_ports[0], self.osd_ports[1] + 1)]

    # ---------------------------------------------------------------- images

    def uri(self, image: str, snap: str | None = None) -> str:
        """The memfs/QEMU spelling of an image (or a snapshot of it)."""
        name = f"{self.pool}/{image}" + (f"@{snap}" if snap else "")
        return f"rbd:{name}:conf={self.conf}:id=admin:keyring={self.keyring}"

    def create_image(self, image: str, size: int) -> None:
        self.run("rbd", "create", "--size", f"{size >> 20}M", f"{self.pool}/{image}")

    def import_image(self, path: str, image: str) -> None:
        self.run("rbd", "import", path, f"{self.pool}/{image}", timeout=300)

    def snap(self, image: str, snap: str) -> None:
        self.run("rbd", "snap", "create", f"{self.pool}/{image}@{snap}")
        self.run("rbd", "snap", "protect", f"{self.pool}/{image}@{snap}")

    def export(self, image: str) -> bytes:
        """The image's bytes, read by Ceph's own tool."""
        out = os.path.join(self.dir, f"export-{uuid.uuid4().hex[:8]}")
        try:
            self.run("rbd", "export", f"{self.pool}/{image}", out, timeout=300)
            with open(out, "rb") as f:
                return f.read()
        finally:
            if os.path.exists(out):
                os.unlink(out)


@contextmanager
def ceph_cluster(addr: str = "127.0.0.1", prefix: tuple[str, ...] = (),
                 **ports: Any) -> Iterator[CephCluster]:
    """A fresh cluster in a temporary directory on a real file system (bluestore
    opens its block file with O_DIRECT, which tmpfs refuses), torn down after."""
    base = tempfile.mkdtemp(prefix="memfs-ceph-", dir="/var/tmp")
    c = CephCluster(base, addr, prefix, **ports)
    try:
        c.bootstrap()
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)
