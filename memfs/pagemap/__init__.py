"""The page map: per page of every region a state, a location and a checksum.

Pure data.  Per-page fields are packed arrays (one ``bytes`` each in the
msgpack file), so that 16 Mi pages load and save in well under a second and a
lying file cannot make us allocate more than the file itself holds.  The file
is a msgfile envelope (magic, version, xxh3-128 of the whole content): a
page map with a single flipped bit is refused, never half-trusted.

Three modules: ``region`` (page states, a region and its tally, the per-page
primitives every layer uses), ``offsets`` (the per-page offsets, packed in
half the memory when they allow) and ``mapfile`` (the page map and its file).
Everything is importable from here, as it was when this was one module.
"""

from .mapfile import FORMAT, MAGIC, VERSION, PageMap, get_field
from .offsets import Offsets
from .region import (MAX_DISKS, MAX_PAGES, MAX_REGIONS, PAGE_SIZE, ZERO_CHECKSUM, ZERO_PAGE,
                     PageMapError, PageState, Region, Tally, check_geometry, check_region_name,
                     checksum, runs, u64_array, u64_bytes)

__all__ = ["FORMAT", "MAGIC", "VERSION", "PageMap", "get_field", "Offsets", "MAX_DISKS", "MAX_PAGES",
           "MAX_REGIONS", "PAGE_SIZE", "ZERO_CHECKSUM", "ZERO_PAGE", "PageMapError",
           "PageState", "Region", "Tally", "check_geometry", "check_region_name", "checksum",
           "runs", "u64_array", "u64_bytes"]
