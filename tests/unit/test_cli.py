"""The `lungnode` command as a user runs it: a subprocess with its own environment."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from lungnode.passwords import verify_password
from tests.conftest import Databases, query

LUNGNODE = str(Path(sys.executable).with_name("lungnode"))


def run(
    args: list[str],
    storage: Path,
    stdin: str = "",
    databases: Databases | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """``lungnode args`` on this storage folder (and its database, when ``databases``)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LUNGNODE_")}
    environment.update({"LUNGNODE_STORAGE_DIR": str(storage), "LUNGNODE_ENV": "testing"})
    if databases is not None:
        environment.update(databases.env(storage))
    environment.update(env)
    return subprocess.run(
        [LUNGNODE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )


def test_db_upgrade_creates_every_table(tmp_path: Path, databases: Databases) -> None:
    storage = tmp_path / "storage"
    result = run(["db", "upgrade"], storage, databases=databases)
    assert result.returncode == 0, result.stderr
    engine = create_engine(databases.url(storage))
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {
        "user",
        "prediction",
        "batch_prediction",
        "series",
        "instance",
        "job",
        "delivery",
        "association",
        "audit_event",
        "alembic_version",
    } <= tables


@pytest.mark.sqlite_only(reason="SQLite's journal mode")
def test_db_upgrade_puts_sqlite_in_wal_mode(tmp_path: Path, databases: Databases) -> None:
    assert run(["db", "upgrade"], tmp_path / "storage").returncode == 0
    with sqlite3.connect(tmp_path / "storage" / "lungnode.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_user_add_hashes_the_password_and_audits(tmp_path: Path, databases: Databases) -> None:
    storage = tmp_path / "storage"
    result = run(
        ["user", "add", "alice", "--role", "radiologist", "--password-stdin"],
        storage,
        stdin="correct horse battery\n",
        databases=databases,
    )
    assert result.returncode == 0, result.stderr
    url = databases.url(storage)
    ((username, role, stored),) = query(url, 'SELECT username, role, password_hash FROM "user"')
    audit = query(url, "SELECT action, target FROM audit_event")
    assert (username, role) == ("alice", "radiologist")
    assert "correct horse" not in stored and verify_password("correct horse battery", stored)
    assert not verify_password("wrong", stored)
    assert audit == [("user.add", "alice")]
    again = run(
        ["user", "add", "alice", "--password-stdin"],
        storage,
        stdin="another password\n",
        databases=databases,
    )
    assert again.returncode == 1 and "exists" in again.stderr
    short = run(
        ["user", "add", "bob", "--password-stdin"], storage, stdin="short\n", databases=databases
    )
    assert short.returncode == 2 and "8 characters" in short.stderr


def test_serve_refuses_default_secret_in_production(tmp_path: Path) -> None:
    result = run(["serve"], tmp_path / "storage", LUNGNODE_ENV="production")
    assert result.returncode == 2
    assert "LUNGNODE_SECRET_KEY" in result.stderr


def test_serve_refuses_plain_http_beyond_loopback_in_production(tmp_path: Path) -> None:
    result = run(
        ["serve"],
        tmp_path / "storage",
        LUNGNODE_ENV="production",
        LUNGNODE_SECRET_KEY="a-production-secret-of-32-chars!",
        LUNGNODE_HTTP_HOST="0.0.0.0",
    )
    assert result.returncode == 2
    assert "LUNGNODE_ALLOW_PLAIN_HTTP" in result.stderr
    assert not (tmp_path / "storage").exists(), "refused only after touching the storage"


def test_invalid_settings_exit_with_a_clear_message(tmp_path: Path) -> None:
    result = run(["db", "upgrade"], tmp_path / "storage", LUNGNODE_PEERS="nonsense")
    assert result.returncode == 2
    assert "NAME=AE@HOST:PORT" in result.stderr


@pytest.mark.parametrize("args", [["--version"], ["serve", "--help"], ["send", "--help"]])
def test_help_and_version(args: list[str], tmp_path: Path) -> None:
    result = run(args, tmp_path / "storage")
    assert result.returncode == 0 and result.stdout


def test_deliveries_list_and_retry_dead_letters(tmp_path: Path, databases: Databases) -> None:
    from lungnode.db.migrate import upgrade
    from lungnode.db.models import Delivery, Job, Series
    from lungnode.db.session import make_engine, make_session_factory

    storage = tmp_path / "storage"
    url = databases.url(storage)
    upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.3")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id)
        session.add(job)
        session.flush()
        session.add(
            Delivery(
                job_id=job.id,
                destination="pacs",
                sop_class_uid="1.2.840.1",
                sop_instance_uid="1.2.3.4",
                path="x.dcm",
                state="dead",
                attempts=3,
                last_status=0xA900,
                last_error="0xA900: refused",
            )
        )
    assert "no dead letters" not in run(["deliveries", "list"], storage, databases=databases).stdout
    listed = run(["deliveries", "list"], storage, databases=databases).stdout
    assert "1.2.3.4" in listed and "0xA900: refused" in listed
    assert run(["deliveries", "retry"], storage, databases=databases).returncode == 2
    retried = run(["deliveries", "retry", "--all"], storage, databases=databases)
    assert retried.returncode == 0 and retried.stdout.startswith("1 dead letter")
    with make_session_factory(engine)() as session:
        row = session.get(Delivery, 1)
        assert row is not None and (row.state, row.attempts) == ("pending", 0)
    assert "no dead letters" in run(["deliveries", "list"], storage, databases=databases).stdout
    engine.dispose()


def test_jobs_list_and_retry_failed_jobs(tmp_path: Path, databases: Databases) -> None:
    from lungnode.db.migrate import upgrade
    from lungnode.db.models import AuditEvent, Job, Series
    from lungnode.db.session import make_engine, make_session_factory

    storage = tmp_path / "storage"
    url = databases.url(storage)

    def lungnode(*args: str) -> subprocess.CompletedProcess[str]:
        return run(list(args), storage, databases=databases)

    upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.3")
        session.add(series)
        session.flush()
        error = "ValueError: shape mismatch"
        reason = f"gave up after 3 attempt(s); last error: {error}"
        session.add_all(
            [
                Job(series_id=series.id, version=1, state="failed", attempts=3, reason=reason),
                Job(series_id=series.id, version=2, state="done", attempts=1),
                Job(series_id=series.id, version=3, state="failed", attempts=3, reason=reason),
            ]
        )
    assert lungnode("jobs", "list", "--state", "queued").stdout == "no queued jobs\n"
    listed = lungnode("jobs", "list", "--state", "failed").stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["1", "3"]
    assert "attempts=3" in listed[0] and "ValueError: shape mismatch" in listed[0]
    assert len(lungnode("jobs", "list").stdout.splitlines()) == 3
    assert lungnode("jobs", "retry").returncode == 2
    # A job that is not failed is left alone, and said so.
    some = lungnode("jobs", "retry", "1", "2")
    assert some.returncode == 1 and "not failed, left alone: 2" in some.stderr
    assert some.stdout.startswith("1 failed job(s) queued again")
    every = lungnode("jobs", "retry", "--all")
    assert every.returncode == 0 and every.stdout.startswith("1 failed job(s)")
    with make_session_factory(engine)() as session:
        states = [(j.state, j.attempts, j.reason) for j in session.query(Job).order_by(Job.id)]
        audit = [(e.actor, e.action, e.target) for e in session.query(AuditEvent)]
    assert states == [("queued", 0, None), ("done", 1, None), ("queued", 0, None)]
    assert audit == [("cli", "job.retry", "1"), ("cli", "job.retry", "3")]
    assert "no failed jobs" in lungnode("jobs", "list", "--state", "failed").stdout
    engine.dispose()


def test_jobs_retry_of_many_failed_jobs_is_audited_in_full(
    tmp_path: Path, databases: Databases
) -> None:
    """The ids of 80 jobs do not fit the audit target (200 characters, which PostgreSQL
    enforces): the retry still succeeds, and the audit keeps every id in its details."""
    import json

    from lungnode.db.migrate import upgrade
    from lungnode.db.models import Job, Series
    from lungnode.db.session import make_engine, make_session_factory

    storage = tmp_path / "storage"
    url = databases.url(storage)
    upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.3")
        session.add(series)
        session.flush()
        session.add_all(
            Job(series_id=series.id, version=v, state="failed", attempts=3, reason="gave up")
            for v in range(1, 81)
        )
    engine.dispose()
    retried = run(["jobs", "retry", "--all"], storage, databases=databases)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith("80 failed job(s) queued again")
    ((target, details),) = query(url, "SELECT target, details FROM audit_event")
    everything = ",".join(str(i) for i in range(1, 81))
    assert len(target) <= 200 and everything.startswith(target.rstrip("…"))
    details = json.loads(details) if isinstance(details, str) else details
    assert details == {"target": everything}
