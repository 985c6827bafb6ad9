"""Shared fixtures: settings on a temporary storage, a running node on free ports,
the test's databases, and access to the real peers (DCMTK, dicom3tools) the tests use.

Every test that touches a database gets it from the ``databases`` fixture (through
``make_settings``, ``settings``, ``node``, the API's ``make_api``, or directly).
``LUNGNODE_TEST_DATABASE`` chooses the backend:

- ``sqlite`` (the default): a file in the test's storage folder, as a node has;
- ``postgresql``: a fresh PostgreSQL database per storage folder, created on the
  server at ``LUNGNODE_TEST_POSTGRES_URL`` (default: user ``postgres`` on
  127.0.0.1:5432, trust) and dropped after the test. Only the tests that use
  ``databases`` run then, less those marked ``sqlite_only`` (they hold only on
  SQLite) and those marked ``backend_neutral`` (slow tests, mostly drills, whose
  outcome does not depend on the backend: a second run would only repeat the
  first). Both are deselected, not skipped: they ran in the SQLite pass, and a
  CI run skips nothing. Each marker says why, next to the test. A server that
  cannot be reached skips them, and fails them under CI=true.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from lungnode.app.node import Node
from lungnode.config import Settings, load_settings
from lungnode.db.session import database_url

if TYPE_CHECKING:
    from tests.serve import ServedNode

#: The calling AE title the tests' SCUs use; it is a configured peer of the node.
SENDER_AE = "TESTSCU"
IN_CI = os.environ.get("CI", "").lower() == "true"

#: The database backend of this run: "sqlite" or "postgresql" (see the module).
TEST_DATABASE = os.environ.get("LUNGNODE_TEST_DATABASE", "").strip().lower() or "sqlite"
ON_POSTGRESQL = TEST_DATABASE in ("postgresql", "postgres")
POSTGRES_ADMIN_URL = os.environ.get(
    "LUNGNODE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def pytest_configure(config: pytest.Config) -> None:
    if TEST_DATABASE not in ("sqlite", "postgresql", "postgres"):
        raise pytest.UsageError(
            f"LUNGNODE_TEST_DATABASE={TEST_DATABASE!r}: expected sqlite or postgresql"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On PostgreSQL, run only the tests that touch a database, less the SQLite-specific
    and the backend-neutral ones (they ran in the SQLite pass)."""
    if not ON_POSTGRESQL:
        return
    selected: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        touches = "databases" in fixtures or "module_databases" in fixtures
        once = any(item.get_closest_marker(m) for m in ("sqlite_only", "backend_neutral"))
        (selected if touches and not once else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def unavailable(message: str) -> NoReturn:
    """A tool or service a test needs is missing: fail under CI=true, skip elsewhere."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Any]:
    """An autocommit connection to the PostgreSQL server's maintenance database."""
    import psycopg

    conninfo = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    with connection:
        yield connection


class Databases:
    """The databases of one test: one per storage folder, as a node has one.

    On SQLite, ``<storage>/lungnode.db``; on PostgreSQL, a fresh database
    ``lungnode_test_<random>`` on the test server, dropped when the test ends.
    """

    def __init__(self, tmp_path: Path, admin: Any | None) -> None:
        self.tmp_path = tmp_path
        self.admin = admin
        self._by_storage: dict[Path, str] = {}
        self._created: list[str] = []

    @property
    def postgresql(self) -> bool:
        return self.admin is not None

    def url(self, storage_dir: Path) -> str:
        """The database of the node whose storage folder this is."""
        key = Path(storage_dir).resolve()
        if key not in self._by_storage:
            if self.admin is None:
                self._by_storage[key] = f"sqlite:///{key / 'lungnode.db'}"
            else:
                self._by_storage[key] = self.fresh()
        return self._by_storage[key]

    def moved(self, storage_dir: Path, to: Path) -> None:
        """The storage folder was moved, its database with it (on PostgreSQL: the same
        database serves the new path, as a volume mounted elsewhere would)."""
        if self.postgresql:
            self._by_storage[Path(to).resolve()] = self.url(storage_dir)

    def fresh(self) -> str:
        """A new, empty database of its own."""
        if self.admin is None:
            return f"sqlite:///{self.tmp_path / f'db-{uuid.uuid4().hex[:8]}.sqlite'}"
        name = f"lungnode_test_{uuid.uuid4().hex[:16]}"
        # template0: nobody connects to it, so a session elsewhere on template1
        # cannot make the copy fail.
        self.admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        self._created.append(name)
        return str(make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False))

    def settings_overrides(self, storage_dir: Path) -> dict[str, Any]:
        """What ``make_settings`` adds: nothing on SQLite (the node's own default)."""
        return {"database_url": self.url(storage_dir)} if self.postgresql else {}

    def env(self, storage_dir: Path) -> dict[str, str]:
        """Environment for a ``lungnode`` subprocess on this storage folder."""
        return {"LUNGNODE_DATABASE_URL": self.url(storage_dir)} if self.postgresql else {}

    def drop_all(self) -> None:
        if self.admin is None:
            return
        for name in self._created:
            self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.clear()


@pytest.fixture
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    admin = request.getfixturevalue("postgres_admin") if ON_POSTGRESQL else None
    registry = Databases(tmp_path, admin)
    yield registry
    registry.drop_all()


@pytest.fixture(scope="module")
def module_databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Databases]:
    """``databases`` for a module's shared server (a module-scoped fixture)."""
    admin = request.getfixturevalue("postgres_admin") if ON_POSTGRESQL else None
    registry = Databases(tmp_path_factory.mktemp("databases"), admin)
    yield registry
    registry.drop_all()


def query(url: str, sql: str, **parameters: Any) -> list[tuple[Any, ...]]:
    """Rows of one statement, read by a connection of its own (another process's
    database, for instance); a table that does not exist yet reads as no rows."""
    engine = create_engine(database_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), parameters)]
    except SQLAlchemyError as exc:
        if "no such table" in str(exc) or "does not exist" in str(exc):
            return []
        raise
    finally:
        engine.dispose()


def execute(url: str, sql: str, **parameters: Any) -> None:
    """Run one statement in a transaction of its own (changing another process's rows)."""
    engine = create_engine(database_url(url), poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text(sql), parameters)
    finally:
        engine.dispose()


def require_tool(name: str) -> str:
    """Path of an external tool; missing fails under CI=true, skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (make test installs it with apt-get as root)")
    return path


def node_settings(storage_dir: Path, databases: Databases, **overrides: Any) -> Settings:
    """Settings for a test node on ``storage_dir``, whose database ``databases`` holds
    (``make_settings`` for one test; a module-scoped node calls this directly)."""
    values: dict[str, Any] = {
        "env": "testing",
        "storage_dir": storage_dir,
        "dicom_host": "127.0.0.1",
        "dicom_port": 0,
        "http_port": 0,
        "peers": f"scu={SENDER_AE}@127.0.0.1:11119",
        "min_free_disk_mb": 0,
        "series_quiet_seconds": 5.0,
        "series_grace_seconds": 0.5,
        "series_check_interval": 0.1,
        # One receiving process unless a test asks for more (ingest_workers tests).
        "ingest_processes": 1,
        "models_dir": Path(__file__).resolve().parents[1] / "models",
    }
    values.update(overrides)
    if "database_url" not in overrides:
        values.update(databases.settings_overrides(Path(values["storage_dir"])))
    return load_settings(**values)


@pytest.fixture
def make_settings(tmp_path: Path, databases: Databases) -> Callable[..., Settings]:
    """Settings for a test node; its database is the storage folder's (``databases``)."""

    def _make(**overrides: Any) -> Settings:
        storage_dir = overrides.pop("storage_dir", tmp_path / "storage")
        return node_settings(storage_dir, databases, **overrides)

    return _make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def start_node() -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def _start(settings: Settings, **kwargs: Any) -> Node:
        node = Node(settings, **kwargs)
        node.start()
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop()


@pytest.fixture
def node(settings: Settings, start_node: Callable[..., Node]) -> Node:
    return start_node(settings, serve_http=False)


@pytest.fixture
def serve_node(tmp_path: Path) -> Iterator[Callable[..., ServedNode]]:
    """Make ``lungnode serve`` subprocesses (tests/serve.py); all killed afterwards.
    A node on the test's database gets ``databases=databases``."""
    from tests.serve import served_nodes

    with served_nodes(tmp_path) as make:
        yield make
