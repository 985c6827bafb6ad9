"""Received instances leave the page cache once they have been read.

An instance is written once, read once or twice soon after (the slice
pre-scorer, the series job) and then rarely again. Left to the kernel, a node
that receives all day fills the page cache with such files and the kernel
must reclaim them before anything else can use the memory. On a virtual
machine that hands its free memory back to the host (free page reporting, a
balloon), every page that has not been used lately costs a fault in the host
when it is used again: writing a 513 KB instance into such pages took about
1.2 ms of CPU, against 0.08 ms into pages just freed (``docs/benchmarks.md``,
"eighth session"). That was the largest single cost of receiving an instance.

So the intake keeps only a window of the instances it wrote last in the page
cache (:class:`RecentFiles`, ``intake_page_cache_mb`` per receiving process)
and drops the oldest beyond it (``posix_fadvise(POSIX_FADV_DONTNEED)``, after
the file is durable, so that no page is dirty). The pages it drops are the
ones the next instance is written into. A reader that is done with an
instance drops it too (:func:`drop`). Dropping is advice: the data stays on
the disk, a later read reads it from there, and where the call does not exist
(not Linux) nothing is dropped.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path

_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def drop(path: Path | str) -> None:
    """Drop the clean pages of ``path`` from the page cache (advice); a missing file,
    or a file system that takes no advice, keeps what it has."""
    if _DONTNEED is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, _DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class RecentFiles:
    """The files written last, up to ``limit_bytes`` in all, kept in the page cache.

    :meth:`add` records a durable file; the oldest files beyond the limit are
    dropped (:func:`drop`). A limit of 0 drops every file as it is added.
    Thread-safe; the drops run outside the lock.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError("the page cache window cannot be negative")
        self.limit_bytes = limit_bytes
        self._files: deque[tuple[Path, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def add(self, path: Path, size: int) -> None:
        """Record ``path`` (``size`` bytes, durable); drop what falls out of the window."""
        leaving: list[Path] = []
        with self._lock:
            self._files.append((path, size))
            self._bytes += size
            while self._files and self._bytes > self.limit_bytes:
                old, old_size = self._files.popleft()
                self._bytes -= old_size
                leaving.append(old)
        for old in leaving:
            drop(old)
