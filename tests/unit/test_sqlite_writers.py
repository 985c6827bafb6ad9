"""SQLite writers of several processes take turns on a file lock, not on SQLite's
busy back-off (``db.session._SqliteWriters``)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text

from lungnode.db.session import make_engine, make_session_factory, write_connection
from tests.conftest import unavailable


def _hold_write_turn(database: str, started: Event, release: Event) -> None:
    """In another process: open a write transaction and keep it until told."""
    engine = make_engine(f"sqlite:///{database}")
    with write_connection(make_session_factory(engine)) as connection:
        connection.execute(text("INSERT INTO t (v) VALUES ('first')"))
        started.set()
        release.wait(30)


def _engine_without_busy_wait(database: Path) -> Engine:
    """No busy timeout at all: a writer that meets SQLite's lock fails at once."""
    engine = make_engine(
        f"sqlite:///{database}", connect_args={"check_same_thread": False, "timeout": 0}
    )

    @event.listens_for(engine, "connect")
    def _no_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=0")

    return engine


def test_a_writer_waits_for_another_process_s_turn_instead_of_finding_the_database_locked(
    tmp_path: Path,
) -> None:
    database = tmp_path / "node.db"
    engine = _engine_without_busy_wait(database)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (v TEXT)"))
    context = multiprocessing.get_context("spawn")
    started, release = context.Event(), context.Event()
    other = context.Process(target=_hold_write_turn, args=(str(database), started, release))
    other.start()
    try:
        assert started.wait(60), "the other process never opened its transaction"
        # Let the other process go on a moment after this one starts waiting.
        releaser = threading.Timer(0.5, release.set)
        releaser.start()
        t0 = time.monotonic()
        with write_connection(make_session_factory(engine)) as connection:
            waited = time.monotonic() - t0
            connection.execute(text("INSERT INTO t (v) VALUES ('second')"))
        releaser.join()
    finally:
        release.set()
        other.join(30)
    assert other.exitcode == 0
    # Without the file lock, BEGIN IMMEDIATE would have failed at once ("database
    # is locked"): there is no busy timeout to wait in.
    assert waited >= 0.3
    with engine.connect() as connection:
        rows = [row[0] for row in connection.execute(text("SELECT v FROM t ORDER BY rowid"))]
    assert rows == ["first", "second"]
    assert (tmp_path / "node.db-writers.lock").exists()


def test_writers_take_turns_through_sqlite_alone_when_the_lock_file_cannot_be_made(
    tmp_path: Path,
) -> None:
    database = tmp_path / "node.db"
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (v TEXT)"))
    (tmp_path / "node.db-writers.lock").mkdir()  # a folder where the lock file would go
    with write_connection(make_session_factory(engine)) as connection:
        connection.execute(text("INSERT INTO t (v) VALUES ('written')"))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM t")).scalar_one() == 1


def test_an_engine_that_goes_away_closes_its_lock_file(tmp_path: Path) -> None:
    """Tests and tools make many engines in one process: none may leave a descriptor."""

    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    if not Path("/proc/self/fd").is_dir():
        unavailable("counting open descriptors needs /proc")
    database = tmp_path / "node.db"
    gc.collect()
    before = open_descriptors()
    for _ in range(20):
        engine = make_engine(f"sqlite:///{database}")
        with write_connection(make_session_factory(engine)) as connection:
            connection.execute(text("CREATE TABLE IF NOT EXISTS t (v TEXT)"))
        engine.dispose()
        del engine, connection
    gc.collect()
    assert open_descriptors() <= before
