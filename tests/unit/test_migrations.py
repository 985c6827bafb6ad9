"""The Alembic migrations create exactly what the models declare, and end at the head,
on each backend (``LUNGNODE_TEST_DATABASE``): a fresh database per test."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from lungnode.db.migrate import alembic_config, upgrade
from lungnode.db.models import Base
from lungnode.db.session import make_engine
from tests.conftest import Databases


def _head(url: str) -> str:
    """The one head of the script directory (a second head would be a forked history)."""
    (head,) = ScriptDirectory.from_config(alembic_config(url)).get_heads()
    return str(head)


def _stamped(url: str) -> list[str]:
    """What the database says it is at: the rows of alembic_version."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return [
                str(v) for v in connection.scalars(text("SELECT version_num FROM alembic_version"))
            ]
    finally:
        engine.dispose()


def test_migrations_match_models(databases: Databases) -> None:
    """Autogenerate finds nothing to do: no drift between the models and the migrated
    schema (types, lengths, nullability, indexes, constraints, server defaults)."""
    url = databases.fresh()
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_upgrade_reaches_the_head_revision(databases: Databases) -> None:
    url = databases.fresh()
    upgrade(url)
    assert _stamped(url) == [_head(url)]


def test_upgrade_is_idempotent(databases: Databases) -> None:
    url = databases.fresh()
    upgrade(url)
    upgrade(url)
    assert _stamped(url) == [_head(url)]


def test_0002_leaves_the_model_identity_of_existing_predictions_unknown(
    databases: Databases,
) -> None:
    """Rows from before 0002 did not record it: NULL, never a guessed "not synthetic"."""
    url = databases.fresh()
    upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO prediction (source, model_name, timestamp) "
                "VALUES ('upload', 'lung-ct-demo', '2026-01-01 00:00:00')"
            )
        )
    upgrade(url, "0002")
    with engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT model_name, model_synthetic, model_intended_use, model_trained_on"
                " FROM prediction"
            )
        ).one()
    engine.dispose()
    assert tuple(row) == ("lung-ct-demo", None, None, None)


def test_a_bare_postgresql_url_is_driven_by_psycopg() -> None:
    """``postgresql://`` names SQLAlchemy's default driver, psycopg2, which is not
    installed: the engine and the migrations use psycopg 3 for it instead."""
    from lungnode.db.session import database_url

    assert database_url("postgresql://u:p@db:5432/lungnode") == (
        "postgresql+psycopg://u:p@db:5432/lungnode"
    )
    assert database_url("postgres://u@db/lungnode") == "postgresql+psycopg://u@db/lungnode"
    assert database_url("postgresql+psycopg2://u@db/x") == "postgresql+psycopg2://u@db/x"
    assert database_url("sqlite:///storage/lungnode.db") == "sqlite:///storage/lungnode.db"


def test_the_pool_of_a_server_database_is_sized_by_the_settings(tmp_path: Path) -> None:
    from lungnode.config import load_settings
    from lungnode.db.session import engine_for

    settings = load_settings(
        env="testing",
        storage_dir=tmp_path,
        database_url="postgresql://u@127.0.0.1:1/none",
        db_pool_size=3,
        db_max_overflow=1,
    )
    engine = engine_for(settings)  # connects to nothing until used
    assert engine.dialect.driver == "psycopg"
    assert (engine.pool.size(), engine.pool._max_overflow) == (3, 1)  # type: ignore[attr-defined]
    engine.dispose()
