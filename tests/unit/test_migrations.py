"""The Alembic migrations create exactly what the models declare, and end at the head."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from lungnode.db.migrate import alembic_config, upgrade
from lungnode.db.models import Base
from lungnode.db.session import make_engine


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


def test_migrations_match_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_upgrade_reaches_the_head_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    assert _stamped(url) == [_head(url)]


def test_upgrade_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    upgrade(url)
    assert _stamped(url) == [_head(url)]


def test_0002_leaves_the_model_identity_of_existing_predictions_unknown(tmp_path: Path) -> None:
    """Rows from before 0002 did not record it: NULL, never a guessed "not synthetic"."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
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
