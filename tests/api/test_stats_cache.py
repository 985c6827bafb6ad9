"""``/stats`` from a short-lived cache, in process or in Redis, never older than the
last prediction written, and never failing because Redis is gone.

Whether an answer was computed or cached is read from the SQL the app's
engine runs: computing it averages the processing times.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, event

from lungnode.api import create_app
from lungnode.db.models import Job, Prediction, Series
from lungnode.db.session import make_engine, make_session_factory
from tests.api.conftest import ADMIN_PASSWORD, API


@contextmanager
def computed(engine: Engine) -> Iterator[list[str]]:
    """The statements of ``engine`` that compute the prediction figures."""
    statements: list[str] = []

    def _record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "avg(" in statement.lower():
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", _record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", _record)


def stats(api: API, role: str = "admin") -> dict[str, Any]:
    response = api.client.get("/api/v1/stats?days=366", headers=api.headers(role))
    assert response.status_code == 200, response.json
    return dict(response.json)


def write_elsewhere(api: API) -> None:
    """A prediction written as another process (a series job in a worker) would."""
    engine = make_engine(api.settings.effective_database_url)
    try:
        with make_session_factory(engine).begin() as session:
            session.add(
                Prediction(
                    source="dicom",
                    prediction_class="Adenocarcinoma",
                    all_scores={},
                    model_name="tiny",
                    model_version="0.0.1",
                    timestamp=datetime.now(UTC),
                    processing_time=0.2,
                )
            )
    finally:
        engine.dispose()


def test_stats_are_cached_until_a_prediction_is_written_or_deleted(api: API) -> None:
    engine = api.app.extensions["lungnode"]["engine"]
    ids = api.add_predictions(5, timestamp=datetime.now(UTC))
    with computed(engine) as statements:
        first = stats(api)
        assert first["total"] == 5 and len(statements) == 1
        again = stats(api)
        assert again == first and len(statements) == 1, "the second answer was computed again"

        write_elsewhere(api)
        after_write = stats(api)
        assert after_write["total"] == 6 and len(statements) == 2
        assert after_write["class_distribution"]["Adenocarcinoma"] == 1

        deleted = api.client.delete(f"/api/v1/history/{ids[0]}", headers=api.headers("admin"))
        assert deleted.status_code == 204, deleted.json
        assert stats(api)["total"] == 5 and len(statements) == 3


def test_a_row_id_used_again_after_a_delete_is_a_new_answer(api: API) -> None:
    """SQLite gives the next row the id of a deleted newest row: the id and the
    count alone would name the answer from before the delete."""
    ids = api.add_predictions(3)
    assert stats(api)["class_distribution"] == {"Normal": 3}
    deleted = api.client.delete(f"/api/v1/history/{ids[-1]}", headers=api.headers("admin"))
    assert deleted.status_code == 204
    assert stats(api)["total"] == 2
    write_elsewhere(api)  # takes the id the deleted row had: 3 rows again, newest id 3
    assert stats(api)["class_distribution"] == {"Normal": 2, "Adenocarcinoma": 1}


def test_each_user_has_their_own_cached_view(api: API) -> None:
    api.add_predictions(3, user_id=api.users["admin"])
    api.add_predictions(2, user_id=api.users["radiologist"])
    for _ in range(2):  # computed, then cached: each time for its own user
        assert stats(api, "admin")["total"] == 5
        assert stats(api, "radiologist")["total"] == 2


def test_queue_depths_stay_live(api: API) -> None:
    api.add_predictions(1)
    assert stats(api)["queue"]["jobs"]["queued"] == 0
    with api.app.extensions["lungnode"]["sessions"].begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.3")
        session.add(series)
        session.flush()
        session.add(Job(series_id=series.id))
    assert stats(api)["queue"]["jobs"]["queued"] == 1


def test_a_zero_lifetime_computes_every_answer(make_api: Callable[..., API]) -> None:
    api = make_api(stats_cache_seconds=0)
    api.add_predictions(2)
    with computed(api.app.extensions["lungnode"]["engine"]) as statements:
        stats(api)
        stats(api)
    assert len(statements) == 2


def test_redis_cache_is_shared_by_the_processes_of_one_node(
    make_api: Callable[..., API], redis_url: str
) -> None:
    api = make_api(cache_url=redis_url)
    api.add_predictions(4)
    # A second API process on the same database and Redis: gunicorn's next worker.
    engine = make_engine(api.settings.effective_database_url)
    other = create_app(api.settings, engine=engine).test_client()
    try:
        assert stats(api)["total"] == 4
        login = {"username": "admin", "password": ADMIN_PASSWORD}
        token = other.post("/api/v1/auth/login", json=login).json["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        with computed(engine) as statements:
            answer = other.get("/api/v1/stats?days=366", headers=auth)
        assert answer.status_code == 200 and answer.json["total"] == 4
        assert statements == [], "the other process computed what the first had cached"
        write_elsewhere(api)
        assert stats(api)["total"] == 5
    finally:
        engine.dispose()


def test_an_unreachable_redis_fails_no_request(make_api: Callable[..., API]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gone = f"redis://127.0.0.1:{port}/0"
    api = make_api(rate_limit_storage_uri=gone, rate_limit_login="3/minute")
    api.add_predictions(2)
    # Login is rate limited: with its store gone, limits are counted in memory.
    assert stats(api)["total"] == 2
    assert stats(api)["total"] == 2
    statuses = [
        api.client.post("/api/v1/auth/login", json={"username": "x", "password": "y"}).status_code
        for _ in range(5)
    ]
    assert 500 not in statuses and 429 in statuses, statuses
