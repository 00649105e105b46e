"""RBD back end: a Ceph RBD image or snapshot, read (and written) through librbd.

Named as QEMU names it: ``rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:OPTION=VALUE...]``
with the options ``conf`` (a ceph.conf), ``id`` (the client name without
``client.``), ``keyring``, ``mon_host`` and memfs's own ``timeout``
(seconds a whole read may take, retries included).  A ``:`` or ``@``
inside a name or value is written ``\\:`` or ``\\@``.

Why librbd and not ``qemu-nbd``'s rbd driver: measured on one host
(docs/ceph.rst), the bindings read a 4 KiB page in 330-390 µs against
750-1100 µs through qemu-nbd and NBD, and sustain 7.6-8.5 k 4 KiB reads/s
with 16 in flight against 1.1-1.9 k; there is no second process to keep
alive.  The bindings (Debian's python3-rbd, python3-rados) are built for
/usr/bin/python3; tools/setup --test links them into a venv of the same
Python version.

I/O is asynchronous (``aio_read``/``aio_write``): librbd calls back from its
own threads and the callback wakes the trio task through the trio token, so
no worker thread waits per request.  librbd itself resends requests when an
OSD restarts; a request that fails is retried here with back-off until the
deadline.  An aborted wait leaves librbd's request running into a buffer
nobody reads.  Every failure is a :class:`DiskError` naming the URI.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Callable

import trio

from .base import Disk, DiskError, DiskURI

log = logging.getLogger("memfs.rbd")

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 4
#: how long connecting to the monitors may take before open fails (or the
#: URI's timeout, if shorter)
CONNECT_TIMEOUT = 20
#: options of the URI; the first three are QEMU's, passed to librados as it does
OPTIONS = ("conf", "id", "keyring", "mon_host", "timeout")
#: errors a retry cannot fix
_FATAL = {errno.EINVAL, errno.EROFS, errno.ENOSPC, errno.EPERM, errno.EACCES, errno.ENOENT}


def _split(text: str, sep: str) -> list[str]:
    """Split at unescaped ``sep``; ``\\x`` stands for ``x``."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def escape(text: str) -> str:
    """The URI spelling of a name or value (for callers that build URIs)."""
    return "".join("\\" + c if c in "\\:@/" else c for c in text)


def parse_rbd(uri: str) -> DiskURI:
    """Parse ``rbd:pool/[ns/]image[@snap][:key=value...]``, or DiskError saying why not."""
    body = uri[len("rbd:"):]
    if "\0" in body:
        raise DiskError(f"{uri}: an rbd name cannot hold a NUL byte")
    head, *opts = _split(body, ":")
    query: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key = _unescape(key)
        if not eq or not key:
            raise DiskError(f"{uri}: rbd options are key=value (got {opt!r})")
        if key not in OPTIONS:
            raise DiskError(f"{uri}: unknown option {key!r} for rbd: "
                            f"(known: {', '.join(OPTIONS)})")
        query[key] = _unescape(value)
    name, *snaps = _split(head, "@")
    if len(snaps) > 1:
        raise DiskError(f"{uri}: more than one @snapshot")
    snap = _unescape(snaps[0]) if snaps else ""
    if snaps and not snap:
        raise DiskError(f"{uri}: empty snapshot name after @")
    parts = [_unescape(p) for p in _split(name, "/")]
    if len(parts) not in (2, 3) or not all(parts):
        raise DiskError(f"{uri}: rbd disks are named rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]"
                        "[:conf=PATH][:id=NAME][:keyring=PATH]")
    if "timeout" in query:
        try:
            if not float(query["timeout"]) > 0:
                raise ValueError
        except ValueError:
            raise DiskError(f"{uri}: timeout must be a positive number of seconds") from None
    pool, image = parts[0], parts[-1]
    namespace = parts[1] if len(parts) == 3 else ""
    export = f"{pool}/{namespace + '/' if namespace else ''}{image}" + (f"@{snap}" if snap
                                                                          else "")
    return DiskURI(uri, "rbd", export=export, pool=pool, namespace=namespace, image=image,
                   snap=snap, query=query)


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as e:
        raise DiskError(f"the librbd Python bindings cannot be imported ({e}): apt-get "
                        "install python3-rbd python3-rados; tools/setup --test links them "
                        "into the venv") from None
    return rados, rbd


def _why(e: BaseException) -> str:
    """The errno's text when the binding's error has one (its own message repeats
    the name as a bytes repr), else the message."""
    code = getattr(e, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(e) or type(e).__name__


class RBDDisk(Disk):
    """One RBD image or snapshot on its own cluster connection."""

    def __init__(self, parsed: DiskURI, writable: bool, timeout: float) -> None:
        self.uri = parsed.uri
        self._parsed = parsed
        self._writable = writable
        self.timeout = timeout
        self.retries = DEFAULT_RETRIES
        self.max_request = 4 << 20  # one RADOS object
        self.size = 0
        self.read_only = bool(parsed.snap) or not writable
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        self._closed = False
        self._token = trio.lowlevel.current_trio_token()
        self._stats = {k: 0 for k in ("rbd_requests", "rbd_retries", "rbd_errors",
                                      "rbd_timeouts", "rbd_bytes_read", "rbd_bytes_written",
                                      "rbd_flushes")}

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(cls, parsed: DiskURI, *, writable: bool = False,
                   create_size: int | None = None) -> "RBDDisk":
        """Connect, open the image (creating it for a capture's volume when
        ``create_size`` is given and it does not exist), learn its size."""
        if writable and parsed.snap:
            raise DiskError(f"{parsed.uri}: a snapshot is read-only; a volume must be an "
                            "image")
        timeout = float(parsed.query.get("timeout", DEFAULT_TIMEOUT))
        self = cls(parsed, writable, timeout)
        try:
            await trio.to_thread.run_sync(self._open_sync, create_size,
                                          abandon_on_cancel=True)
        except DiskError:
            await self.aclose()
            raise
        log.info("%s: %d bytes%s", self.uri, self.size,
                 " (snapshot, read-only)" if parsed.snap else "")
        return self

    def _open_sync(self, create_size: int | None) -> None:
        rados, rbd = _bindings()
        q = self._parsed.query
        wait = max(1, round(min(CONNECT_TIMEOUT, self.timeout)))
        conf = {"client_mount_timeout": str(wait), "rados_mon_op_timeout": str(wait),
                # librados's own complaints would land on the daemon's stderr: the
                # DiskError says what failed
                "log_to_stderr": "false", "err_to_stderr": "false"}
        if "keyring" in q:
            conf["keyring"] = q["keyring"]
        if "mon_host" in q:
            conf["mon_host"] = q["mon_host"]
        step = "configure"
        try:
            if "conf" in q and not os.path.isfile(q["conf"]):
                raise DiskError(f"{self.uri}: cannot open: conf {q['conf']}: "
                                "No such file")
            # no conf: librados's search path ("") unless mon_host says where to go
            conffile = q.get("conf", None if "mon_host" in q else "")
            self._cluster = rados.Rados(rados_id=q.get("id", "admin"), conffile=conffile,
                                        conf=conf)
            step = "connect to the monitors"
            self._cluster.connect(timeout=wait)
            step = f"pool {self._parsed.pool}"
            self._ioctx = self._cluster.open_ioctx(self._parsed.pool)
            if self._parsed.namespace:
                self._ioctx.set_namespace(self._parsed.namespace)
            step = f"image {self._parsed.image}"
            try:
                self._image = self._open_image(rbd)
            except rbd.ImageNotFound:
                if not (self._writable and create_size is not None):
                    raise
                rbd.RBD().create(self._ioctx, self._parsed.image, create_size,
                                 old_format=False, features=rbd.RBD_FEATURE_LAYERING)
                self._image = self._open_image(rbd)
            self.size = self._image.size()
            if self._writable and create_size is not None and self.size < create_size:
                self._image.resize(create_size)
                self.size = create_size
        except DiskError:
            raise
        except Exception as e:  # rados.Error, rbd.Error and their kin
            why = _why(e)
            if why == os.strerror(errno.ENOENT) and step == "configure":
                why = "no ceph.conf found (conf=PATH or mon_host=ADDRS)"
            elif why == os.strerror(errno.ENOENT) and step.startswith("connect"):
                why = "no keyring for the client (keyring=PATH)"
            raise DiskError(f"{self.uri}: cannot open: {step}: {why}") from None

    def _open_image(self, rbd: Any) -> Any:
        p = self._parsed
        if p.snap:
            return rbd.Image(self._ioctx, p.image, snapshot=p.snap, read_only=True)
        return rbd.Image(self._ioctx, p.image, read_only=not self._writable)

    # ------------------------------------------------------------ requests

    async def _aio(self, what: str, start: Callable[[Callable[..., None]], Any],
                   deadline: float | None) -> bytes | None:
        """One librbd aio request, retried with back-off until it succeeds or
        the deadline (the disk's timeout, or the caller's if nearer) passes."""
        self._stats["rbd_requests"] += 1
        began = trio.current_time()
        limit = began + self.timeout
        if deadline is not None:
            limit = min(limit, deadline)
        last = "no answer from the cluster"
        errors = 0
        with trio.move_on_at(limit) as scope:
            while True:
                if self._closed or self._image is None:
                    raise DiskError(f"{self.uri}: disk is closed")
                done = trio.Event()
                box: list[Any] = []

                def callback(comp: Any, data: bytes | None = None) -> None:
                    box.append((comp.get_return_value(), data))
                    try:
                        self._token.run_sync_soon(done.set)
                    except trio.RunFinishedError:
                        pass
                try:
                    start(callback)
                except Exception as e:
                    ret, data = -(getattr(e, "errno", None) or errno.EIO), None
                    last = _why(e)
                else:
                    await done.wait()
                    ret, data = box[0]
                    last = os.strerror(-ret) if ret < 0 else ""
                if ret >= 0:
                    return data
                if -ret in _FATAL or errors >= self.retries:
                    break
                errors += 1
                self._stats["rbd_retries"] += 1
                log.warning("%s: %s failed (%s); retry %d of %d", self.uri, what, last,
                            errors, self.retries)
                await trio.sleep(min(0.05 * 4 ** (errors - 1), 2.0))
        if scope.cancelled_caught:
            self._stats["rbd_timeouts"] += 1
            last = f"timed out after {trio.current_time() - began:.1f} s ({last})"
        self._stats["rbd_errors"] += 1
        log.error("%s: %s failed: %s", self.uri, what, last)
        raise DiskError(f"{self.uri}: {what} failed: {last}")

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise DiskError(f"{self.uri}: disk is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"{self.uri}: {length} bytes at {offset} is beyond the end "
                            f"({self.size} bytes)")

    async def read(self, offset: int, length: int, *, deadline: float | None = None) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        what = f"read of {length} bytes at {offset}"
        data = await self._aio(what, lambda cb: self._image.aio_read(offset, length, cb),
                               deadline)
        if data is None or len(data) != length:
            self._stats["rbd_errors"] += 1
            raise DiskError(f"{self.uri}: {what} failed: short read "
                            f"({0 if data is None else len(data)} bytes)")
        self._stats["rbd_bytes_read"] += length
        return data

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if not self._writable:
            raise DiskError(f"{self.uri}: opened read-only")
        self._check(offset, len(data))
        if not len(data):
            return
        payload = bytes(data)
        await self._aio(f"write of {len(payload)} bytes at {offset}",
                        lambda cb: self._image.aio_write(payload, offset, cb), None)
        self._stats["rbd_bytes_written"] += len(payload)

    async def flush(self) -> None:
        if self._closed:
            raise DiskError(f"{self.uri}: disk is closed")
        if not self._writable:
            return
        await self._aio("flush", lambda cb: self._image.aio_flush(cb), None)
        self._stats["rbd_flushes"] += 1

    async def aclose(self) -> None:
        """Close the image and the cluster connection (in a thread: librbd
        waits for its requests in flight)."""
        if self._closed:
            return
        self._closed = True
        image, ioctx, cluster = self._image, self._ioctx, self._cluster
        self._image = self._ioctx = self._cluster = None

        def close() -> None:
            for obj, how in ((image, "close"), (ioctx, "close"), (cluster, "shutdown")):
                if obj is not None:
                    try:
                        getattr(obj, how)()
                    except Exception as e:  # closing: nothing left to tell the caller
                        log.warning("%s: %s: %s", self.uri, how, _why(e))
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close)

    def stats(self) -> dict[str, int]:
        return dict(self._stats)


__all__ = ["RBDDisk", "parse_rbd", "escape", "DEFAULT_TIMEOUT"]
