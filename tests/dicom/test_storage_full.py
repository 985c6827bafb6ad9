"""A full disk under the node's storage: writes are all or nothing, and a C-STORE is
refused with 0xA700 (out of resources), whatever part of the store met the full disk.

The storage is a small tmpfs of the test's own (``tests.support.small_disk``; needs
root: fails under CI=true without it, skips elsewhere). The drill with the figures is
``tests/drills/test_disk_full.py``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Instance
from lungnode.dicom.intake import write_all_atomically
from tests.dicom.helpers import row_count, store_all
from tests.support.small_disk import fill, small_disk
from tests.support.synthetic import make_ct_series


def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 4) as disk:
        kept = disk / "results" / "a.dcm"
        kept.parent.mkdir()
        kept.write_bytes(b"the results of an earlier attempt")
        files = [
            (disk / "results" / "b.dcm", b"b" * 2**20),
            (kept, b"a" * 2**20),
            (disk / "reports" / "r.pdf", b"r" * 3 * 2**20),  # no room for this one
        ]
        with pytest.raises(OSError) as info:
            write_all_atomically(files)
        assert info.value.errno == errno.ENOSPC
        # None of the set, the earlier file whole, no temporary file, the room given back.
        assert sorted(p.name for p in disk.rglob("*") if p.is_file()) == ["a.dcm"]
        assert kept.read_bytes() == b"the results of an earlier attempt"
        write_all_atomically(files[:2])
        assert kept.read_bytes() == b"a" * 2**20
        assert (disk / "results" / "b.dcm").stat().st_size == 2**20


def test_a_store_on_a_full_disk_is_out_of_resources_and_resumes(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """Before, the association's row that the full disk (under SQLite's database) could
    not record answered 0xC000 "cannot understand": the sender then gives the
    instance up as bad instead of sending it again."""
    with small_disk(tmp_path / "disk", 8) as disk:
        node = start_node(make_settings(storage_dir=disk / "storage", workers=0), serve_http=False)
        series = make_ct_series(4, rows=64, columns=64)
        assert store_all(node.scp.port, series[:2]) == [0x0000] * 2
        filler = disk / "filler"
        fill(filler)
        assert store_all(node.scp.port, series[2:]) == [0xA700] * 2
        assert list(disk.rglob("*.part")) == []
        filler.unlink()
        assert store_all(node.scp.port, series[2:]) == [0x0000] * 2
        assert row_count(node, Instance) == 4
        node.stop()
