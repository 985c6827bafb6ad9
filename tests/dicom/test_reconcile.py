"""Reconciling the incoming folder at start: stray files registered, stale temporary
files removed, and a temporary file another receiving process is writing left alone."""

from __future__ import annotations

import os
import time
from io import BytesIO
from pathlib import Path

import pytest

from lungnode.dicom.intake import instance_path, parse_instance, reconcile
from lungnode.domain import InstanceFacts
from lungnode.errors import IntakeError
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


def _damaged(encoded: bytes, damage: str) -> bytes:
    if damage == "not a transfer syntax":
        # (0002,0010) 1.2.840.10008.1.2.1 -> 1.2.840.10008.1.3.1: a UID, but of no syntax.
        return encoded.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.3.1\x00", 1)
    # "unknown VR": Pixel Data (7FE0,0010) with the VR "NW", which pydicom cannot convert.
    return encoded.replace(b"\xe0\x7f\x10\x00OW", b"\xe0\x7f\x10\x00NW", 1)


@pytest.mark.parametrize("damage", ["not a transfer syntax", "unknown VR"])
def test_reconcile_counts_a_damaged_file_and_goes_on(tmp_path: Path, damage: str) -> None:
    """Found by the fuzzing drill: these made parse_instance raise ValueError and
    NotImplementedError instead of IntakeError, and reconcile (at the node's start)
    with them: one damaged file in the incoming folder kept the node from starting."""
    incoming = tmp_path / "incoming"
    good, bad = make_ct_series(2, rows=32, columns=32)
    for dataset, encoded in ((good, _encoded(good)), (bad, _damaged(_encoded(bad), damage))):
        _dataset, facts = parse_instance(_encoded(dataset))
        path = instance_path(incoming, facts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded)
    with pytest.raises(IntakeError) as refused:
        parse_instance(_damaged(_encoded(bad), damage))
    assert refused.value.status == 0xC000
    registered: list[str] = []

    def register(facts: InstanceFacts, path: Path, size: int, association: int | None) -> bool:
        registered.append(facts.sop_instance_uid)
        return True

    assert reconcile(incoming, set(), register) == (1, 1)
    assert registered == [str(good.SOPInstanceUID)]
