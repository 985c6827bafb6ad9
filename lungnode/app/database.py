"""Open the node's database for one process: storage folder, migrations, engine.

Every role and command opens the database through :func:`open_database`, so
the order (make the storage folder, migrate, then connect) is written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import Settings
from lungnode.db.migrate import upgrade
from lungnode.db.session import engine_for, make_session_factory


@dataclass(frozen=True)
class Database:
    engine: Engine
    sessions: sessionmaker[Session]


def connect(settings: Settings, *, migrate: bool = True) -> Database:
    """The process's engine and session factory, after migrating (unless told not to)."""
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        upgrade(settings.effective_database_url)
    engine = engine_for(settings)
    return Database(engine, make_session_factory(engine))


@contextmanager
def open_database(settings: Settings, *, migrate: bool = True) -> Iterator[Database]:
    """:func:`connect` for the length of a command; the engine is disposed after."""
    database = connect(settings, migrate=migrate)
    try:
        yield database
    finally:
        database.engine.dispose()
