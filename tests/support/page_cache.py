"""How much of a file is in the page cache (``mincore``), for the tests of
``dicom.page_cache``."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from pathlib import Path

from lungnode.dicom.page_cache import drop
from tests.conftest import unavailable


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of ``path``), read with mincore(2)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if size == 0:
        return 0, 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    with path.open("rb") as stream:
        # A private mapping is writable for ctypes; nothing is written, so every page
        # still stands for the file's own page in the cache.
        mapping = mmap.mmap(stream.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        vector = (ctypes.c_ubyte * pages)()
        start = ctypes.c_char.from_buffer(mapping)
        try:
            address = ctypes.c_void_p(ctypes.addressof(start))
            if libc.mincore(address, ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del start  # the mapping cannot close while a buffer of it is exported
        return sum(byte & 1 for byte in vector), pages
    finally:
        mapping.close()


def require_dropping(directory: Path) -> None:
    """Fail under CI (skip elsewhere) where the page cache of ``directory``'s file system
    takes no advice: not Linux, or a file system whose pages are its storage (tmpfs)."""
    if not sys.platform.startswith("linux"):
        unavailable("dropping pages from the page cache (posix_fadvise) is Linux's")
    probe = directory / "page-cache-probe"
    probe.write_bytes(os.urandom(64 * 1024))
    with probe.open("rb+") as stream:
        os.fsync(stream.fileno())
    drop(probe)
    cached, _pages = resident_pages(probe)
    probe.unlink()
    if cached:
        unavailable(f"the file system of {directory} keeps its pages when advised to drop them")
