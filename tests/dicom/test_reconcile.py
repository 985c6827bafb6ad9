"""Reconciling the incoming folder at start: stray files registered, stale temporary
files removed, and a temporary file another receiving process is writing left alone."""

from __future__ import annotations

import os
import time
from io import BytesIO
from pathlib import Path

from lungnode.dicom.intake import instance_path, parse_instance, reconcile
from lungnode.domain import InstanceFacts
from tests.support.synthetic import make_ct_series


def _encoded(dataset: object) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)  # type: ignore[attr-defined]
    return buffer.getvalue()


def test_reconcile_keeps_a_part_file_still_being_written(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    (stray,) = make_ct_series(1, rows=32, columns=32)
    _dataset, facts = parse_instance(_encoded(stray))
    path = instance_path(incoming, facts)
    path.parent.mkdir(parents=True)
    path.write_bytes(_encoded(stray))
    stale, live = path.parent / ".stale.part", path.parent / ".live.part"
    stale.write_bytes(b"never acknowledged")
    live.write_bytes(b"another process is writing this")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    registered: list[tuple[InstanceFacts, Path]] = []

    def register(facts: InstanceFacts, path: Path, size: int, association: int | None) -> bool:
        registered.append((facts, path))
        return True

    assert reconcile(incoming, set(), register, stale_part_seconds=120) == (1, 0)
    assert registered == [(facts, path)]
    assert not stale.exists() and live.exists()
    # A file the database knows is not registered again.
    assert reconcile(incoming, {str(path)}, register, stale_part_seconds=120) == (0, 0)
