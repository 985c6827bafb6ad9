"""What counts as "storage full" (``errors.storage_full``): the errors a real write and
a real database raise when they cannot grow, also when wrapped, and nothing else."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from lungnode.errors import StorageFull, storage_full
from tests.conftest import unavailable


def test_a_write_that_finds_no_room() -> None:
    if not Path("/dev/full").exists():
        unavailable("/dev/full (the device that is always full) is missing")
    with pytest.raises(OSError) as info, open("/dev/full", "wb", buffering=0) as device:
        device.write(b"x")
    assert info.value.errno == errno.ENOSPC and storage_full(info.value)
    assert storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert storage_full(StorageFull("storage full"))


def test_sqlite_that_cannot_grow_through_sqlalchemy(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'small.db'}")
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE t (x BLOB)")
        with pytest.raises(OperationalError) as info, engine.begin() as connection:
            connection.exec_driver_sql("PRAGMA max_page_count = 4")
            connection.exec_driver_sql("INSERT INTO t VALUES (zeroblob(100000))")
    finally:
        engine.dispose()
    assert "database or disk is full" in str(info.value)
    assert storage_full(info.value)


def test_a_cause_further_down_the_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("cannot save the report") from exc
    except RuntimeError as outer:
        assert storage_full(outer)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.EACCES, "Permission denied"),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        OSError("cannot write PNG"),
        ValueError("operands could not be broadcast together"),
        MemoryError(),
    ],
)
def test_other_faults_are_not(exc: Exception) -> None:
    assert not storage_full(exc)
