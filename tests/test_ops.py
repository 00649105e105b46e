"""The Operations class called directly, without a kernel."""

from __future__ import annotations

import errno
import json
import os

import pyfuse3
import pytest
from types import SimpleNamespace

from memfs.capture import capture
from memfs.daemon import Daemon, MountOptions
from memfs.fs import META_DIR, ROOT
from memfs.pagemap import PageMap
from ramimage import PS


@pytest.fixture
async def daemon(tmp_path, ram):
    path, data = ram
    await capture([("ram0", path)], str(tmp_path / "vol"), str(tmp_path / "pm"), progress=False)
    d = Daemon(MountOptions(str(tmp_path / "mnt"), pagemap=PageMap.load(tmp_path / "pm"),
                            store_dir=str(tmp_path / "store")))
    await d.install(d.opts.pagemap)
    yield d, data
    await d._stack.aclose()
    d.store.close()


async def lookup(ops, parent: int, name: str) -> pyfuse3.EntryAttributes:
    return await ops.lookup(parent, name.encode())


async def read_meta(ops, name: str) -> str:
    attr = await lookup(ops, META_DIR, name)
    fi = await ops.open(attr.st_ino, os.O_RDONLY, None)
    assert fi.direct_io and not fi.keep_cache
    try:
        return (await ops.read(fi.fh, 0, 1 << 20)).decode()
    finally:
        await ops.release(fi.fh)


async def test_region_file_attributes_and_reads(daemon) -> None:
    d, data = daemon
    ops = d.fs
    attr = await lookup(ops, ROOT, "ram0")
    assert attr.st_size == len(data)
    fi = await ops.open(attr.st_ino, os.O_RDWR, None)
    assert fi.keep_cache and not fi.direct_io  # never direct_io on a region: breaks mmap
    assert await ops.read(fi.fh, 3 * PS, 2 * PS) == data[3 * PS:5 * PS]
    assert await ops.read(fi.fh, len(data), PS) == b""


async def test_unknown_names_are_enoent(daemon) -> None:
    ops = daemon[0].fs
    for parent, name in ((ROOT, "ram9"), (META_DIR, "nope"), (ROOT, "control")):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await lookup(ops, parent, name)
        assert e.value.errno == errno.ENOENT


async def test_resize_refused_same_size_accepted(daemon) -> None:
    d, data = daemon
    ops = d.fs
    ino = (await lookup(ops, ROOT, "ram0")).st_ino
    # SetattrFields cannot be built from Python; the handler reads only these
    fields = SimpleNamespace(update_size=True, update_mode=False, update_uid=False,
                             update_gid=False)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = len(data)
    assert (await ops.setattr(ino, attr, fields, None, None)).st_size == len(data)
    attr.st_size = len(data) * 2
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.setattr(ino, attr, fields, None, None)
    assert e.value.errno == errno.EPERM


async def test_stats_files_are_current(daemon) -> None:
    d, data = daemon
    ops = d.fs
    before = json.loads(await read_meta(ops, "stats.json"))
    assert before["pages_total"] == len(data) // PS
    assert int(await read_meta(ops, "reads")) == 0
    fi = await ops.open((await lookup(ops, ROOT, "ram0")).st_ino, os.O_RDONLY, None)
    await ops.read(fi.fh, 0, len(data))
    after = json.loads(await read_meta(ops, "stats.json"))
    assert after["reads"] == 1 and after["pages_remote"] == 0
    assert int(await read_meta(ops, "pages_local")) == after["pages_local"] > 0
    assert " .. " in await read_meta(ops, "read_latency_us")
    assert int(await read_meta(ops, "pid")) == os.getpid()


async def test_control_errors_are_reported(daemon) -> None:
    ops = daemon[0].fs
    ino = (await lookup(ops, META_DIR, "control")).st_ino
    fi = await ops.open(ino, os.O_WRONLY, None)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.write(fi.fh, 0, b"frobnicate\n")
    assert e.value.errno == errno.EINVAL
    assert "unknown control command" in await read_meta(ops, "last_error")
    with pytest.raises(pyfuse3.FUSEError):  # a map is already installed
        await ops.write(fi.fh, 0, b"load /nonexistent\n")
    assert "cannot read page map" in await read_meta(ops, "last_error")


async def test_stats_files_are_read_only(daemon) -> None:
    ops = daemon[0].fs
    ino = (await lookup(ops, META_DIR, "reads")).st_ino
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(ino, os.O_WRONLY, None)
    assert e.value.errno == errno.EACCES


async def test_unexpected_errors_become_eio(daemon) -> None:
    ops = daemon[0].fs
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(10**9, 0, 10)  # unknown handle
    assert e.value.errno == errno.EBADF
