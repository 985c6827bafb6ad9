"""Shared directory fsyncs (``dicom.intake.DirectorySyncs``): one fsync can serve many
writers, but never one whose rename came after that fsync began."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lungnode.dicom import intake
from lungnode.dicom.intake import DirectorySyncs, write_atomically


class _CountingFsync:
    """Counts the real directory fsyncs; the first one can be held until released."""

    def __init__(self, hold_first: bool = False, seconds: float = 0.0) -> None:
        self.calls = 0
        self.seconds = seconds
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self._real = intake._fsync_directory
        self._lock = threading.Lock()

    def __call__(self, directory: Path) -> None:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            self.entered.set()
            assert self.release.wait(10)
        time.sleep(self.seconds)  # a disk whose flushes take that long
        self._real(directory)


def test_a_request_made_during_a_running_fsync_gets_a_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = _CountingFsync(hold_first=True)
    monkeypatch.setattr(intake, "_fsync_directory", fsync)
    syncs = DirectorySyncs()
    first = threading.Thread(target=syncs.sync, args=(tmp_path,))
    first.start()
    assert fsync.entered.wait(10)
    # This caller's rename happened after the running fsync began: it must not count.
    second = threading.Thread(target=syncs.sync, args=(tmp_path,))
    second.start()
    second.join(0.3)
    assert second.is_alive(), "returned on an fsync that started before its request"
    fsync.release.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert fsync.calls == 2


def test_concurrent_writers_share_fsyncs_and_each_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = _CountingFsync(seconds=0.005)
    monkeypatch.setattr(intake, "_fsync_directory", fsync)
    syncs = DirectorySyncs()
    writers, rounds = 8, 25
    start = threading.Barrier(writers)
    done: list[int] = []

    def writer() -> None:
        start.wait()
        for _ in range(rounds):
            syncs.sync(tmp_path)
        done.append(1)

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(done) == writers
    # Writers queued behind a running fsync share the next one.
    assert 0 < fsync.calls <= writers * rounds // 2
    assert not syncs._states, "per-directory state outlived its waiters"


def test_a_failed_fsync_raises_and_the_next_caller_runs_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = DirectorySyncs()
    with pytest.raises(FileNotFoundError):
        syncs.sync(tmp_path / "gone")
    fsync = _CountingFsync()
    monkeypatch.setattr(intake, "_fsync_directory", fsync)
    syncs.sync(tmp_path)
    assert fsync.calls == 1


def test_write_atomically_recreates_a_directory_removed_after_a_first_write(
    tmp_path: Path,
) -> None:
    target = tmp_path / "study" / "series" / "a.dcm"
    write_atomically(target, b"one")
    target.unlink()
    target.parent.rmdir()  # as housekeeping removes an old series folder
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert not list(target.parent.glob(".*.part"))


def test_the_folders_known_to_exist_stay_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake, "_KNOWN_DIRECTORIES_MAX", 5)
    monkeypatch.setattr(intake, "_known_directories", set())
    for series in range(12):
        write_atomically(tmp_path / f"series-{series}" / "a.dcm", b"x")
    assert 0 < len(intake._known_directories) <= 5
    assert (tmp_path / "series-11" / "a.dcm").read_bytes() == b"x"
