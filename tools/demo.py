"""The main job on the embedded default: a local file stands in for the disk.

Makes a RAM image (zero, random and repeated pages), captures it to a file
volume, mounts the page map, reads the region back through mmap, says whether
the bytes are identical, shows the stats and unmounts.  Run by tools/demo.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import subprocess
import sys
import time

PS = 4096
HERE = os.path.dirname(os.path.abspath(__file__))
MEMFS = [sys.executable, "-m", "memfs.cli"]


def make_ram(path: str, mib: int) -> None:
    """A quarter zero pages, an eighth one repeated page, the rest random."""
    rnd = random.Random(2026)
    rep = rnd.randbytes(PS)
    with open(path, "wb") as f:
        for i in range(mib * 256):
            k = i % 8
            f.write(bytes(PS) if k in (0, 4) else rep if k == 6 else rnd.randbytes(PS))


def run(*args: str) -> None:
    print("$ memfs " + " ".join(args), flush=True)
    subprocess.run(MEMFS + list(args), check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256, help="RAM size in MiB (256)")
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(HERE), "demo-out"))
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    ram = f"/dev/shm/memfs-demo-{os.getpid()}.ram"
    vol, pm, mnt = (os.path.join(a.dir, n) for n in ("vm.vol", "vm.pagemap", "mnt"))
    os.makedirs(mnt, exist_ok=True)
    print(f"making a {a.size} MiB RAM image {ram}", flush=True)
    make_ram(ram, a.size)
    mounted = False
    try:
        run("capture", "--ram", ram, "--volume", vol, "--out", pm)
        run("mount", pm, mnt, "--log", os.path.join(a.dir, "memfs.log"))
        mounted = True
        with open(ram, "rb") as f:
            want = f.read()
        t0 = time.monotonic()
        with open(os.path.join(mnt, "ram0"), "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            got = m[:]
            m.close()
        dt = time.monotonic() - t0
        same = got == want
        print(f"read {len(got) >> 20} MiB back through mmap of {mnt}/ram0 in {dt:.2f}s "
              f"({len(got) / dt / (1 << 20):.0f} MiB/s)")
        print("IDENTICAL: the mounted region equals the captured RAM" if same else
              "DIFFERENT: the mounted region does not equal the captured RAM")
        run("stats", mnt)
        return 0 if same else 1
    finally:
        if mounted:
            run("umount", mnt)
        os.unlink(ram)
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
