"""Core statements run on SQLite's own connection write what Core writes
(``db.driver_statements``), and fail as Core fails."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from lungnode.db import driver_statements
from lungnode.db.models import Association, Base, Instance, Series
from lungnode.db.repo import _INSERT_INSTANCE, _REOPEN_SERIES, _TOUCH_SERIES, NodeRepository
from lungnode.db.session import make_engine, make_session_factory, write_connection
from lungnode.domain import InstanceFacts

_RECEIVED = datetime(2026, 12, 7, 18, 30, 1, 123456, tzinfo=UTC)


def _database(path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(Series).values(
                id=1,
                study_instance_uid="1.2.3",
                series_instance_uid="1.2.3.4",
                state="complete",
                first_received_at=_RECEIVED,
                last_received_at=_RECEIVED,
                completed_at=_RECEIVED,
            )
        )
    return engine


def _instance(uid: str, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "series_id": 1,
        "association_id": None,
        "sop_instance_uid": uid,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "instance_number": 7,
        "number_of_frames": 1,
        "position": [-175.5, -175.5, 12.25],
        "orientation": None,
        "path": "incoming/1.2.3/1.2.3.4/1.dcm",
        "size_bytes": 525_000,
        "received_at": _RECEIVED,
    }
    return values | changes


def _stored(engine: Engine, table: str) -> list[tuple[Any, ...]]:
    """The rows as SQLite holds them (text, not what SQLAlchemy reads back)."""
    database = engine.url.database
    assert database is not None
    with sqlite3.connect(database) as raw:
        return raw.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def _run_both(tmp_path: Path, statements: list[tuple[Any, dict[str, Any]]]) -> list[Engine]:
    """The same statements through Core in one database, on the driver in another."""
    core, driver = _database(tmp_path / "core.db"), _database(tmp_path / "driver.db")
    for engine, run in (
        (core, lambda c, s, p: c.execute(s, p).rowcount),
        (driver, driver_statements.execute),
    ):
        with engine.begin() as connection:
            counts = [run(connection, statement, params) for statement, params in statements]
        assert counts == [1] * len(statements)
    return [core, driver]


def test_the_instance_row_and_the_series_touch_are_stored_as_core_stores_them(
    tmp_path: Path,
) -> None:
    eastern = timezone(timedelta(hours=-5))
    later = datetime(2026, 12, 7, 13, 31, 0, 5, tzinfo=eastern)  # 18:31 UTC
    core, driver = _run_both(
        tmp_path,
        [
            (_INSERT_INSTANCE, _instance("1.2.3.4.1")),
            (_INSERT_INSTANCE, _instance("1.2.3.4.2", orientation=[1, 0, 0, 0, 1, 0])),
            (
                _INSERT_INSTANCE,
                _instance("1.2.3.4.3", position=None, instance_number=None, received_at=later),
            ),
            (_TOUCH_SERIES, {"sid": 1, "now": later, "declared": 300, "ae": "CT01"}),
            (_TOUCH_SERIES, {"sid": 1, "now": later, "declared": None, "ae": "OTHER"}),
            (_REOPEN_SERIES, {"sid": 1}),
        ],
    )
    for table in ("instance", "series"):
        assert _stored(driver, table) == _stored(core, table)
    # And what was stored is what was meant, read back through the ORM.
    with make_session_factory(driver)() as session:
        instances = session.scalars(select(Instance).order_by(Instance.id)).all()
        series = session.get(Series, 1)
    assert [i.received_at for i in instances] == [_RECEIVED, _RECEIVED, later]
    assert instances[0].position == [-175.5, -175.5, 12.25]
    assert instances[1].orientation == [1, 0, 0, 0, 1, 0]
    assert series is not None
    assert (series.state, series.completed_at) == ("receiving", None)
    assert (series.declared_count, series.calling_ae) == (300, "CT01")


def test_a_statement_that_matches_no_row_counts_none(tmp_path: Path) -> None:
    engine = _database(tmp_path / "node.db")
    with engine.begin() as connection:
        assert driver_statements.execute(connection, _REOPEN_SERIES, {"sid": 1}) == 1
        # Receiving now: nothing left to reopen.
        assert driver_statements.execute(connection, _REOPEN_SERIES, {"sid": 1}) == 0


def test_a_duplicate_raises_sqlalchemy_s_integrity_error_with_the_driver_s_cause(
    tmp_path: Path,
) -> None:
    engine = _database(tmp_path / "node.db")
    with engine.begin() as connection:
        driver_statements.execute(connection, _INSERT_INSTANCE, _instance("1.2.3.4.1"))
    with pytest.raises(IntegrityError) as raised, engine.begin() as connection:
        driver_statements.execute(connection, _INSERT_INSTANCE, _instance("1.2.3.4.1"))
    assert isinstance(raised.value.orig, sqlite3.IntegrityError)
    assert "instance.sop_instance_uid" in str(raised.value.orig)
    # The failed transaction was rolled back; the first row is there once.
    assert len(_stored(engine, "instance")) == 1


def test_a_column_default_left_to_compute_runs_through_core(tmp_path: Path) -> None:
    engine = _database(tmp_path / "node.db")
    values = _instance("1.2.3.4.1")
    del values["received_at"], values["number_of_frames"]  # Python-side defaults
    with engine.begin() as connection:
        assert driver_statements.execute(connection, _INSERT_INSTANCE, values) == 1
    with make_session_factory(engine)() as session:
        row = session.scalars(select(Instance)).one()
    assert row.number_of_frames == 1
    assert abs(row.received_at - datetime.now(UTC)) < timedelta(minutes=1)


def _facts(number: int) -> InstanceFacts:
    return InstanceFacts(
        "1.2.3", "1.2.3.9", f"1.2.3.9.{number}", "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.2.1", "CT", 1, number, 1, [0.0, 0.0, float(number)],
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], None,
    )  # fmt: skip


def test_registering_an_instance_runs_nothing_through_sqlalchemy_s_execution(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    Base.metadata.create_all(engine)
    repo = NodeRepository(make_session_factory(engine), tmp_path)
    association = repo.association_started("CT01", "127.0.0.1:1")
    assert repo.register_instance(_facts(1), tmp_path / "1.dcm", 10, association)
    through_sqlalchemy: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn: Connection, _cursor: Any, statement: str, *_rest: Any) -> None:
        through_sqlalchemy.append(statement)

    assert repo.register_instance(_facts(2), tmp_path / "2.dcm", 10, association)
    assert not repo.register_instance(_facts(2), tmp_path / "2.dcm", 10, association)
    assert through_sqlalchemy == []
    with make_session_factory(engine)() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.path)).all()
        calling_ae = session.scalar(select(Series.calling_ae))
        assert session.get(Association, association) is not None
    assert sorted(rows) == [("1.2.3.9.1", "1.dcm"), ("1.2.3.9.2", "2.dcm")]
    assert calling_ae == "CT01"


def test_a_begin_that_finds_the_database_locked_raises_sqlalchemy_s_error(
    tmp_path: Path,
) -> None:
    database = tmp_path / "node.db"
    engine = make_engine(
        f"sqlite:///{database}", connect_args={"check_same_thread": False, "timeout": 0}
    )

    @event.listens_for(engine, "connect")
    def _no_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=0")

    Base.metadata.create_all(engine)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        # Past this process's turn (write_connection) SQLite's own lock is held.
        with (
            pytest.raises(OperationalError) as raised,
            write_connection(make_session_factory(engine)),
        ):
            pass
    finally:
        holder.rollback()
        holder.close()
    assert isinstance(raised.value.orig, sqlite3.OperationalError)
    assert "locked" in str(raised.value.orig)
