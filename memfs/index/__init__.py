"""Disk index: which 4 KiB blocks of a disk hold which content (issue 6).

A guest's page cache is full of copies of blocks of its own virtual disk.
``memfs index DISK --out INDEX`` hashes every 4 KiB-aligned block of a disk
(a file, or an NBD export such as a qcow2 image served by ``qemu-nbd``) with
xxh3-64, the page checksum of the page map, and keeps a compact index from
hash to block.  ``memfs capture --disk DISK --index INDEX`` then asks a
:class:`DiskReferencer` for every page it would otherwise write to the
migration volume: a page whose checksum is in the index *and whose bytes
equal the block on the disk* gets that block's location instead of a copy.

The index file is msgpack in a msgfile envelope (magic, version, xxh3-128 of
the whole content: a corrupt index is refused); its per-block data are
packed little-endian uint64 arrays (``hashes`` sorted and distinct, ``blocks``
the block number of each hash), looked up by binary search.  Zero blocks are
not indexed (capture never asks for zero pages).  One block is kept per
distinct content.  ``chunks`` holds a coarse xxh3 per 1 MiB of the disk:
the fingerprint that lets a re-index skip the per-block work for unchanged
chunks.

Re-indexing (``--base OLD``) reuses the old entries of every chunk that did
not change.  How it learns what changed:

* ``--changed-since OVERLAY.qcow2``: the disk is the frozen view
  ``OVERLAY`` over a backing chain that ``OLD`` indexed.  Only the ranges
  ``qemu-img map`` reports as allocated in ``OVERLAY`` itself are read and
  hashed; the rest of the disk is not read at all.
* otherwise the whole disk is read again and only chunks whose coarse hash
  changed are hashed block by block.  That saves the per-block hashing and
  the rebuild of their entries, not the reading: a disk that cannot say what
  changed must be read to know.

A page map may only refer to data that will not change (DESIGN.md invariant
6), so :func:`open_referencer` refuses a disk that is not read-only — a file
with a write bit in its mode, a block device without the read-only flag, an
NBD export without ``NBD_FLAG_READ_ONLY``, an RBD image that is not a
snapshot (``rbd:pool/image@snap``) — unless the caller says it is frozen.

The package, along DESIGN.md's layers: ``format`` is the file (pure data:
load, save, validate, look up), ``build`` hashes a disk into one, and
``referencer`` is what capture asks for a page's block.  The command is
memfs.cli.index.  Nothing is imported here, so that a reader of the format
does not load the builder or capture's names.
"""
