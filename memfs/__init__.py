"""memfs: lazy guest RAM for live migration, served over FUSE from a disk."""

__version__ = "0.1.0"
PAGE_SIZE = 4096
