"""Received instances leave the page cache (``dicom.page_cache``): the intake keeps a
window of the ones it wrote last, and the decoder drops what it has read whole.

Checked on real files with mincore(2) (``tests.support.page_cache``).
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from lungnode.dicom.decode import decode_slice, load_series
from lungnode.dicom.intake import Intake
from lungnode.dicom.page_cache import RecentFiles, drop
from lungnode.domain import InstanceFacts
from tests.support.page_cache import require_dropping, resident_pages
from tests.support.synthetic import make_ct_series, write_series

KIB = 1024


def _durable_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes, fsynced: its pages are in the cache and clean."""
    with path.open("wb") as stream:
        stream.write(os.urandom(size))
        stream.flush()
        os.fsync(stream.fileno())
    return path


def _cached(path: Path) -> bool:
    """Every page of ``path`` is in the page cache."""
    cached, pages = resident_pages(path)
    return cached == pages


def _dropped(path: Path) -> bool:
    return resident_pages(path)[0] == 0


def test_the_window_keeps_the_files_written_last_and_drops_the_older(tmp_path: Path) -> None:
    require_dropping(tmp_path)
    files = [_durable_file(tmp_path / f"{i}.dcm", 256 * KIB) for i in range(5)]
    assert all(_cached(path) for path in files)
    window = RecentFiles(600 * KIB)  # room for two of them
    for path in files:
        window.add(path, 256 * KIB)
    assert [_dropped(path) for path in files] == [True, True, True, False, False]
    assert _cached(files[3]) and _cached(files[4])
    assert len(window) == 2 and window.kept_bytes == 512 * KIB


def test_a_window_of_nothing_drops_each_file_as_it_comes(tmp_path: Path) -> None:
    require_dropping(tmp_path)
    window = RecentFiles(0)
    path = _durable_file(tmp_path / "one.dcm", 128 * KIB)
    window.add(path, 128 * KIB)
    assert _dropped(path)
    assert len(window) == 0


def test_a_file_gone_before_its_turn_is_no_error(tmp_path: Path) -> None:
    window = RecentFiles(0)
    window.add(tmp_path / "removed-meanwhile.dcm", 1)
    drop(tmp_path / "never-there.dcm")


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        RecentFiles(-1)


def _encoded(dataset: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _intake(root: Path, page_cache_bytes: int | None) -> tuple[Intake, list[Path]]:
    stored: list[Path] = []

    def register(facts: InstanceFacts, path: Path, size: int, association: int | None) -> bool:
        stored.append(path)
        return True

    return Intake(root, register, page_cache_bytes=page_cache_bytes), stored


def test_the_intake_leaves_only_its_window_in_the_page_cache(tmp_path: Path) -> None:
    require_dropping(tmp_path)
    series = [_encoded(ds) for ds in make_ct_series(4, rows=256, columns=256)]
    size = len(series[0])  # 128 KiB of pixels and the header
    intake, stored = _intake(tmp_path / "incoming", page_cache_bytes=2 * size)
    for encoded in series:
        intake.store(encoded)
    assert [_dropped(path) for path in stored] == [True, True, False, False]
    assert _cached(stored[2]) and _cached(stored[3])


def test_without_a_window_the_intake_leaves_the_page_cache_to_the_kernel(
    tmp_path: Path,
) -> None:
    require_dropping(tmp_path)
    intake, stored = _intake(tmp_path / "incoming", page_cache_bytes=None)
    for dataset in make_ct_series(3, rows=128, columns=128):
        intake.store(_encoded(dataset))
    assert all(_cached(path) for path in stored)


def test_decoding_drops_the_instances_it_read(tmp_path: Path) -> None:
    require_dropping(tmp_path)
    paths = write_series(make_ct_series(3, rows=128, columns=128), tmp_path / "series")
    for path in paths:
        with path.open("rb") as stream:
            os.fsync(stream.fileno())
    assert all(_cached(path) for path in paths)
    decoded = decode_slice(paths[0])
    assert decoded is not None and decoded[1].shape == (128, 128)
    assert _dropped(paths[0]) and _cached(paths[1])
    volume = load_series(paths)
    assert volume.hu.shape == (3, 128, 128)
    assert all(_dropped(path) for path in paths)
