"""One engine per process, and the session factory.

SQLite runs in WAL mode with a busy timeout, so the SCP's writes, the
completion timer and the API's reads proceed together. ``synchronous=NORMAL``:
a committed row survives a crash of any lungnode process (the write-ahead log
is in the operating system's hands at commit), and a commit costs no fsync.
A power loss may take the last commits with it; no acknowledged instance goes
with them, since its file and folder were fsynced before the answer, and the
start-up reconciliation registers every stored file the database does not know.
On PostgreSQL a commit is durable when it returns (``synchronous_commit``).

PostgreSQL is reached through psycopg 3: a plain ``postgresql://`` URL names
SQLAlchemy's default driver for it, psycopg2, which lungnode does not install,
so :func:`database_url` rewrites it (once, here) to ``postgresql+psycopg://``.
Its connection pool is sized per process by the ``db_pool_size`` and
``db_max_overflow`` settings (:func:`engine_for`); each role needs a different
number of connections at once.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from lungnode.config import Settings
from lungnode.db import models  # noqa: F401  (their mappers are configured at start)
from lungnode.db.driver_statements import execute_driver_sql

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own lock alone
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: URL schemes that name PostgreSQL without a driver, and the one lungnode ships.
_BARE_POSTGRESQL = ("postgresql://", "postgres://")
POSTGRESQL_DRIVER = "postgresql+psycopg://"


def database_url(url: str) -> str:
    """``url`` with a bare ``postgresql://`` (or ``postgres://``) given the psycopg 3
    driver; any other URL, a driver named explicitly included, is left as it is."""
    for scheme in _BARE_POSTGRESQL:
        if url.startswith(scheme):
            return POSTGRESQL_DRIVER + url[len(scheme) :]
    return url


def engine_for(settings: Settings) -> Engine:
    """The process's engine for these settings, its pool sized by them."""
    return make_engine(
        settings.effective_database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )


def make_engine(
    url: str, *, pool_size: int | None = None, max_overflow: int | None = None, **kwargs: Any
) -> Engine:
    """Create the process's engine; SQLite gets WAL, foreign keys and a busy timeout.

    ``pool_size`` and ``max_overflow`` size the pool of a server database; SQLite
    keeps SQLAlchemy's default pool, since its writers take turns on one lock anyway.
    """
    url = database_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # The driver stays in autocommit mode: the "begin" hook below opens
            # every transaction itself (SQLAlchemy's documented pysqlite recipe).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Writers take the write lock at BEGIN: a deferred transaction that later
            # upgrades can fail at once with SQLITE_BUSY when another writer holds it.
            # Connections marked read-only (execution option) do not need it. Sent on
            # the driver's connection: SQLAlchemy's execution around a statement with
            # no parameters and no rows cost more than SQLite's BEGIN itself.
            read_only = conn.get_execution_options().get("sqlite_read_only")
            execute_driver_sql(conn, "BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if pool_size is not None:
        kwargs.setdefault("pool_size", pool_size)
    if max_overflow is not None:
        kwargs.setdefault("max_overflow", max_overflow)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """The process's sessions. The ORM's mappers are configured here, at start, once
    per process: otherwise the first row written through the ORM does it (tens of
    milliseconds), and that is the first association's first instance."""
    configure_mappers()  # every mapper of ``db.models``, imported above
    return sessionmaker(bind=engine, expire_on_commit=False)


class _SqliteWriters:
    """The turn of one engine's writers at its SQLite database, in every process.

    SQLite has one writer at a time, and a writer that finds the database locked
    retries in sleeps of 1 ms, then 2, 5, 10 and longer: on a node that receives in
    several processes (``ingest_processes``), every instance row then waited a
    sleep or two for another process's commit of well under a millisecond. So
    writers take turns on two locks first: a thread lock in this process, then an
    exclusive ``flock`` on a file beside the database (``<database>-writers.lock``),
    which the kernel hands to the next process the moment it is released, and
    releases itself when a process dies. A writer that does not take them (another
    program, a migration) still meets SQLite's own lock and busy timeout, as before.
    Where the file cannot be opened (a read-only folder) or ``flock`` does not
    exist, processes take turns through SQLite alone.
    """

    def __init__(self, database: str | None) -> None:
        self.thread_lock = threading.Lock()
        self._path = f"{database}-writers.lock" if database and database != ":memory:" else None
        #: (process id, descriptor): each process opens the file itself, since a
        #: descriptor inherited through fork shares its lock with the parent.
        self._fd: tuple[int, int] | None = None

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self.thread_lock:
            fd = self._descriptor()
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as exc:  # a filesystem without locks (ENOLCK)
                    logger.info("SQLite writers take turns through SQLite alone: %s", exc)
                    self._path, fd = None, None
            if fd is None:
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _descriptor(self) -> int | None:
        """This process's descriptor of the lock file; called with the thread lock."""
        if self._path is None or fcntl is None:
            return None
        pid = os.getpid()
        if self._fd is not None and self._fd[0] == pid:
            return self._fd[1]
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            logger.info("SQLite writers take turns through SQLite alone: %s", exc)
            self._path = None
            return None
        self._fd = (pid, fd)
        # Closed with this object (its engine's lifetime), or at exit.
        weakref.finalize(self, os.close, fd)
        return fd


_writers: weakref.WeakKeyDictionary[Engine, _SqliteWriters] = weakref.WeakKeyDictionary()
_writers_guard = threading.Lock()


def _engine_of(sessions: sessionmaker[Session]) -> Engine | None:
    bind = sessions.kw.get("bind")
    return bind if isinstance(bind, Engine) else None


def _sqlite_writers(engine: Engine | None) -> _SqliteWriters | None:
    if engine is None or engine.dialect.name != "sqlite":
        return None
    with _writers_guard:
        writers = _writers.get(engine)
        if writers is None:
            writers = _writers[engine] = _SqliteWriters(engine.url.database)
        return writers


@contextmanager
def write_transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A committed-or-rolled-back transaction for writing.

    SQLite has one writer at a time. Taking turns on a lock (``_SqliteWriters``:
    in this process, then across processes) is far cheaper than SQLite's busy-wait
    back-off (sleeps of 1 ms and more); other databases need none.
    """
    writers = _sqlite_writers(_engine_of(sessions))
    if writers is None:
        with sessions.begin() as session:
            yield session
        return
    with writers.turn(), sessions.begin() as session:
        yield session


@contextmanager
def write_connection(sessions: sessionmaker[Session]) -> Iterator[Connection]:
    """As :func:`write_transaction`, on a plain Core connection: no ORM unit of work.

    The instance row is written once per received instance; the ORM session's own
    bookkeeping around three Core statements was most of its cost.
    """
    engine = _engine_of(sessions)
    if engine is None:
        with write_transaction(sessions) as session:
            yield session.connection()
        return
    writers = _sqlite_writers(engine)
    if writers is None:
        with engine.begin() as connection:
            yield connection
        return
    with writers.turn(), engine.begin() as connection:
        yield connection


def read_sessions(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """A factory for read-only work: on SQLite, a plain BEGIN that takes no write lock."""
    engine = _engine_of(sessions)
    if engine is None or engine.dialect.name != "sqlite":
        return sessions
    return sessionmaker(
        bind=engine.execution_options(sqlite_read_only=True), expire_on_commit=False
    )
