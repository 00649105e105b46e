"""The benchmark guest's virtio-blk disk: made of random content, and the
QEMU arguments that attach it (a qcow2 file here, an RBD image with --rig)."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

from benchlib import rigstate

MIB = 1 << 20


def disk_args(image: Path | str) -> list[str]:
    """The guest's virtio-blk disk: a qcow2 file, or (a str, --rig) the name of
    an RBD image on the storage host, opened by QEMU's rbd driver."""
    ceph = rigstate.CEPH
    node = (f"driver=rbd,node-name=disk0,pool={ceph.pool},image={image},conf={ceph.conf},"
            f"user=admin" if isinstance(image, str) else
            f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image}")
    return ["-blockdev", node, "-device", "virtio-blk-pci,drive=disk0,id=vblk0"]


def make_disk(where: Path, mib: int) -> tuple[Path | str, str]:
    """A qcow2 image of ``mib`` MiB of random content, and its md5; with --rig
    an RBD image (layering only: no lock between the two QEMUs) instead."""
    where.mkdir(parents=True, exist_ok=True)
    raw, image = where / "disk.raw", where / "disk.qcow2"
    md5 = hashlib.md5()
    rnd = random.Random(4)
    with open(raw, "wb") as f:
        for _ in range(mib):
            block = rnd.randbytes(MIB)
            md5.update(block)
            f.write(block)
    ceph = rigstate.CEPH
    if ceph is not None:
        name = f"disk-{where.name}"
        ceph.run("rbd", "import", "--image-feature", "layering", str(raw),
                 f"{ceph.pool}/{name}", timeout=300)
        raw.unlink()
        return name, md5.hexdigest()
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(image)], check=True, timeout=120)
    raw.unlink()
    return image, md5.hexdigest()
