"""A small disk of its own for a test (a tmpfs mount), and a filler file that fills it.

Mounting needs root: without it (or where mounting fails) the test is
``unavailable``: it fails under CI=true and is skipped elsewhere.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import unavailable

_CHUNK = 1 << 20


@contextmanager
def small_disk(mount_point: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted at ``mount_point`` (created), unmounted after."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        unavailable("the disk-full tests mount a small tmpfs, which needs root")
    mount = shutil.which("mount")
    if mount is None:
        unavailable("mount is not installed")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # A file a stopped node still holds open would keep the mount busy: detach it
        # then (the kernel frees it once closed).
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def fill(filler: Path, leave_bytes: int = 0) -> int:
    """Grow ``filler`` until at most ``leave_bytes`` are free on its disk (0: until a
    write fails with ENOSPC). Returns the bytes written by this call."""
    written = 0
    with filler.open("ab", buffering=0) as stream:
        while True:
            room = free_bytes(filler.parent) - leave_bytes
            if room <= 0:
                break
            try:
                written += stream.write(b"\0" * min(_CHUNK, room)) or 0
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        try:
            os.fsync(stream.fileno())
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return written
