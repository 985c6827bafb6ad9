"""Admin node status: series, jobs, deliveries (and retry), peers; the role matrix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lungnode.db.models import AuditEvent, Delivery, Instance, Job, Series
from tests.api.conftest import API


@pytest.fixture
def node_rows(api: API) -> API:
    with api.app.extensions["lungnode"]["sessions"].begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.3", state="complete")
        session.add(series)
        session.flush()
        session.add_all(
            Instance(
                series_id=series.id,
                sop_instance_uid=f"1.2.3.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"/x/{i}.dcm",
                size_bytes=10,
            )
            for i in range(3)
        )
        session.add(Series(study_instance_uid="1.2", series_instance_uid="1.2.4"))
        job = Job(series_id=series.id, state="done", details={"total": 1.5})
        session.add(job)
        session.flush()
        for i, state in enumerate(("dead", "pending")):
            session.add(
                Delivery(
                    job_id=job.id,
                    destination="pacs",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    sop_instance_uid=f"9.9.{i}",
                    path=f"/r/{i}.dcm",
                    state=state,
                    attempts=5,
                    last_error="refused" if state == "dead" else None,
                    next_attempt_at=datetime(2026, 1, 1, tzinfo=UTC),
                )
            )
    return api


def test_series_jobs_deliveries(node_rows: API) -> None:
    api = node_rows
    admin = api.headers("admin")
    series = api.client.get("/api/v1/series", headers=admin).json
    assert series["total"] == 2
    complete = api.client.get("/api/v1/series?state=complete", headers=admin).json["items"]
    assert [(s["series_instance_uid"], s["instance_count"]) for s in complete] == [("1.2.3", 3)]
    jobs = api.client.get("/api/v1/jobs?state=done", headers=admin).json
    assert jobs["total"] == 1 and jobs["items"][0]["details"] == {"total": 1.5}
    dead = api.client.get("/api/v1/deliveries?state=dead", headers=admin).json["items"]
    assert [d["last_error"] for d in dead] == ["refused"]
    assert api.client.get("/api/v1/deliveries?state=lost", headers=admin).status_code == 422
    assert api.client.get("/api/v1/series?per_page=1&page=2", headers=admin).json["pages"] == 2


def test_retry_a_dead_delivery(node_rows: API) -> None:
    api = node_rows
    admin = api.headers("admin")
    dead, pending = (
        api.client.get(f"/api/v1/deliveries?state={s}", headers=admin).json["items"][0]["id"]
        for s in ("dead", "pending")
    )
    retried = api.client.post(f"/api/v1/deliveries/{dead}/retry", headers=admin)
    assert retried.status_code == 200, retried.json
    assert retried.json["state"] == "pending" and retried.json["attempts"] == 0
    again = api.client.post(f"/api/v1/deliveries/{pending}/retry", headers=admin)
    assert again.status_code == 409 and again.json["error"]["code"] == "conflict"
    assert api.client.post("/api/v1/deliveries/999/retry", headers=admin).status_code == 404
    with api.app.extensions["lungnode"]["sessions"]() as session:
        assert session.query(AuditEvent).filter_by(action="delivery.retry").count() == 1


@pytest.fixture
def job_rows(api: API) -> dict[str, int]:
    """A failed job, one waiting out its back-off after a failed attempt, and a done one."""
    with api.app.extensions["lungnode"]["sessions"].begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.7", state="complete")
        session.add(series)
        session.flush()
        error = "ValueError: shape mismatch"
        jobs = {
            "failed": Job(
                series_id=series.id,
                version=1,
                state="failed",
                attempts=3,
                last_error=error,
                reason=f"gave up after 3 attempt(s); last error: {error}",
            ),
            "retrying": Job(
                series_id=series.id,
                version=2,
                state="queued",
                attempts=1,
                last_error="OSError: [Errno 28] No space left on device",
                next_attempt_at=datetime(2026, 1, 1, 12, tzinfo=UTC),
            ),
            "done": Job(series_id=series.id, version=3, state="done", attempts=1),
        }
        session.add_all(jobs.values())
        session.flush()
        return {state: job.id for state, job in jobs.items()}


def test_jobs_show_attempts_next_attempt_and_last_error(api: API, job_rows: dict[str, int]) -> None:
    admin = api.headers("admin")
    (failed,) = api.client.get("/api/v1/jobs?state=failed", headers=admin).json["items"]
    assert (failed["attempts"], failed["next_attempt_at"]) == (3, None)
    assert failed["last_error"] == "ValueError: shape mismatch"
    assert failed["reason"].startswith("gave up after 3 attempt(s)")
    (queued,) = api.client.get("/api/v1/jobs?state=queued", headers=admin).json["items"]
    assert queued["attempts"] == 1 and queued["next_attempt_at"].startswith("2026-01-01T12:00")
    assert queued["last_error"].startswith("OSError")
    metrics = api.client.get("/api/v1/metrics").get_data(as_text=True)
    assert 'lungnode_jobs{state="failed"} 1.0' in metrics
    assert "lungnode_jobs_retrying 1.0" in metrics


def test_retry_a_failed_job(api: API, job_rows: dict[str, int]) -> None:
    admin = api.headers("admin")
    retried = api.client.post(f"/api/v1/jobs/{job_rows['failed']}/retry", headers=admin)
    assert retried.status_code == 200, retried.json
    body = retried.json
    assert (body["state"], body["attempts"], body["reason"], body["next_attempt_at"]) == (
        "queued",
        0,
        None,
        None,
    )
    assert body["last_error"] == "ValueError: shape mismatch"  # kept: why it was retried
    for state in ("failed", "retrying", "done"):  # the first is queued now
        again = api.client.post(f"/api/v1/jobs/{job_rows[state]}/retry", headers=admin)
        assert again.status_code == 409 and again.json["error"]["code"] == "conflict"
    missing = api.client.post("/api/v1/jobs/999/retry", headers=admin)
    assert missing.status_code == 404 and missing.json["error"]["code"] == "not_found"
    for role in ("radiologist", "viewer"):
        refused = api.client.post(
            f"/api/v1/jobs/{job_rows['done']}/retry", headers=api.headers(role)
        )
        assert refused.status_code == 403
    assert api.client.post(f"/api/v1/jobs/{job_rows['done']}/retry").status_code == 401
    with api.app.extensions["lungnode"]["sessions"]() as session:
        events = session.query(AuditEvent).filter_by(action="job.retry").all()
        assert [(e.actor, e.target) for e in events] == [("admin", str(job_rows["failed"]))]


def test_peers(make_api: object) -> None:
    api = make_api(  # type: ignore[operator]
        peers="pacs=ORTHANC@10.0.0.5:4242,ws=WS@10.0.0.9:104",
        result_destinations="pacs",
        commit_peers="pacs",
    )
    body = api.client.get("/api/v1/peers", headers=api.headers("admin")).json
    assert body["result_destinations"] == ["pacs"]
    assert [
        (p["name"], p["result_destination"], p["storage_commitment"]) for p in body["items"]
    ] == [("pacs", True, True), ("ws", False, False)]


def test_effective_settings_are_shown_to_admins_with_secrets_masked(make_api: object) -> None:
    token = "s3cr3t-archive-token"
    api = make_api(  # type: ignore[operator]
        dicomweb_peers=f"archive=https://archive.example.org/dicom-web;token={token}",
        broker_url="redis://:brokerpass@127.0.0.1:6379/0",
        max_associations=17,
    )
    response = api.client.get("/api/v1/settings", headers=api.headers("admin"))
    assert response.status_code == 200
    shown = response.json["settings"]
    assert shown["max_associations"] == "17" and shown["ae_title"] == "LUNGNODE"
    assert shown["secret_key"] == "********" and shown["admin_password"] == "********"
    assert "brokerpass" not in shown["broker_url"] and "127.0.0.1:6379" in shown["broker_url"]
    text = response.get_data(as_text=True)
    for secret in (token, "brokerpass", api.settings.secret_key.get_secret_value()):
        assert secret not in text
    assert "archive=https://archive.example.org/dicom-web" in shown["dicomweb_peers"]
    peers = api.client.get("/api/v1/peers", headers=api.headers("admin")).json
    assert peers["dicomweb_peers"] == [shown["dicomweb_peers"]]
    assert token not in str(peers)
    for role in ("radiologist", "viewer"):
        denied = api.client.get("/api/v1/settings", headers=api.headers(role))
        assert denied.status_code == 403


def test_deliveries_show_the_commitment_state(api: API) -> None:
    """A delivery to a committing destination: ``sent`` with its transaction and the
    time its report is due, then ``committed``; both states can be asked for."""
    due = datetime(2026, 1, 1, 12, tzinfo=UTC)
    with api.app.extensions["lungnode"]["sessions"].begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.8", state="complete")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, state="done")
        session.add(job)
        session.flush()
        for i, state in enumerate(("sent", "committed")):
            session.add(
                Delivery(
                    job_id=job.id,
                    destination="pacs",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    sop_instance_uid=f"9.8.{i}",
                    path=f"/r/{i}.dcm",
                    state=state,
                    attempts=1,
                    commit_transaction_uid=f"2.25.{i + 1}",
                    commit_due_at=due if state == "sent" else None,
                )
            )
    admin = api.headers("admin")
    (sent,) = api.client.get("/api/v1/deliveries?state=sent", headers=admin).json["items"]
    assert sent["commit_transaction_uid"] == "2.25.1"
    assert sent["commit_due_at"].startswith("2026-01-01T12:00")
    (committed,) = api.client.get("/api/v1/deliveries?state=committed", headers=admin).json["items"]
    assert (committed["commit_transaction_uid"], committed["commit_due_at"]) == ("2.25.2", None)
    stats = api.client.get("/api/v1/stats", headers=admin).json["queue"]["deliveries"]
    assert (stats["sent"], stats["committed"]) == (1, 1)
    metrics = api.client.get("/api/v1/metrics").get_data(as_text=True)
    assert 'lungnode_deliveries{state="committed"} 1.0' in metrics


EVERYONE = {"admin", "radiologist", "viewer"}
UPLOADERS = {"admin", "radiologist"}
ADMINS = {"admin"}

MATRIX = [
    ("GET", "/api/v1/auth/me", EVERYONE),
    ("GET", "/api/v1/users", ADMINS),
    ("POST", "/api/v1/users", ADMINS),
    ("PATCH", "/api/v1/users/2", ADMINS),
    ("POST", "/api/v1/upload", UPLOADERS),
    ("POST", "/api/v1/predict", UPLOADERS),
    ("POST", "/api/v1/batch-predict", UPLOADERS),
    ("GET", "/api/v1/history", EVERYONE),
    ("GET", "/api/v1/history/1", EVERYONE),
    ("DELETE", "/api/v1/history/1", UPLOADERS),
    ("GET", "/api/v1/download/1", EVERYONE),
    ("GET", "/api/v1/heatmaps/1/0.png", EVERYONE),
    ("GET", "/api/v1/stats", EVERYONE),
    ("GET", "/api/v1/series", ADMINS),
    ("GET", "/api/v1/jobs", ADMINS),
    ("POST", "/api/v1/jobs/1/retry", ADMINS),
    ("GET", "/api/v1/deliveries", ADMINS),
    ("POST", "/api/v1/deliveries/1/retry", ADMINS),
    ("GET", "/api/v1/peers", ADMINS),
]


@pytest.mark.parametrize(("method", "path", "allowed"), MATRIX)
def test_role_matrix(api: API, method: str, path: str, allowed: set[str]) -> None:
    assert api.client.open(path, method=method).status_code == 401
    for role in ("admin", "radiologist", "viewer"):
        response = api.client.open(path, method=method, headers=api.headers(role), json={})
        if role in allowed:
            assert response.status_code != 403, (role, response.json)
        else:
            assert response.status_code == 403, (role, response.status_code)
            assert response.json["error"]["code"] == "forbidden"


@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/metrics", "/api/v1/openapi.json"])
def test_public_routes_need_no_token(api: API, path: str) -> None:
    assert api.client.get(path).status_code in (200, 503)


def test_deliveries_of_one_job(node_rows: API) -> None:
    api = node_rows
    admin = api.headers("admin")
    job_id = api.client.get("/api/v1/jobs", headers=admin).json["items"][0]["id"]
    mine = api.client.get(f"/api/v1/deliveries?job_id={job_id}", headers=admin).json
    assert mine["total"] == 2 and {d["job_id"] for d in mine["items"]} == {job_id}
    other = api.client.get(f"/api/v1/deliveries?job_id={job_id + 1}", headers=admin).json
    assert other["total"] == 0
    assert api.client.get("/api/v1/deliveries?job_id=0", headers=admin).status_code == 422


def test_hourly_counts_of_the_last_day(api: API) -> None:
    now = datetime.now(UTC)
    with api.app.extensions["lungnode"]["sessions"].begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.9", state="complete")
        session.add(series)
        session.flush()
        # Two instances this hour, one two hours ago, one two days ago (outside).
        for i, hours_ago in enumerate((0, 0, 2, 48)):
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=f"1.2.9.{i}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"/x/{i}.dcm",
                    size_bytes=10,
                    received_at=now - timedelta(hours=hours_ago),
                )
            )
        jobs = (("done", 0), ("done", 3), ("failed", 0), ("done", 30))
        for version, (state, hours_ago) in enumerate(jobs, start=1):
            finished = now - timedelta(hours=hours_ago)
            session.add(
                Job(series_id=series.id, version=version, state=state, finished_at=finished)
            )
    for role in ("admin", "radiologist", "viewer"):
        response = api.client.get("/api/v1/stats/hourly", headers=api.headers(role))
        assert response.status_code == 200, response.json
        hours = response.json["hours"]
        assert len(hours) == 24
        assert [h["instances_received"] for h in hours][-3:] == [1, 0, 2]
        assert [h["series_analysed"] for h in hours][-4:] == [1, 0, 0, 1]
        assert sum(h["instances_received"] for h in hours) == 3
        starts = [datetime.fromisoformat(h["hour"]) for h in hours]
        assert starts[-1] <= now < starts[-1] + timedelta(hours=1)
        assert all(b - a == timedelta(hours=1) for a, b in zip(starts, starts[1:], strict=False))
    assert api.client.get("/api/v1/stats/hourly").status_code == 401
