"""History paging, filters and visibility; detail, delete, heatmaps, download; statistics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lungnode.db.models import AuditEvent, Job, Prediction, Series
from tests.api.conftest import API


@pytest.fixture
def seeded(api: API) -> API:
    """25 uploads by the radiologist, 5 DICOM results, 3 uploads by the admin."""
    api.add_predictions(25, user_id=api.users["radiologist"])
    api.add_predictions(
        5,
        source="dicom",
        prediction_class="Adenocarcinoma",
        study_instance_uid="1.2.3.4",
        start=datetime(2026, 2, 1, tzinfo=UTC),
    )
    api.add_predictions(3, user_id=api.users["admin"], start=datetime(2026, 3, 1, tzinfo=UTC))
    return api


def _history(api: API, role: str, query: str = "") -> dict:  # type: ignore[type-arg]
    response = api.client.get(f"/api/v1/history{query}", headers=api.headers(role))
    assert response.status_code == 200, response.json
    return dict(response.json)


def test_pagination_edges(seeded: API) -> None:
    first = _history(seeded, "admin", "?per_page=10")
    assert (first["total"], first["pages"], first["page"], first["per_page"]) == (33, 4, 1, 10)
    stamps = [item["timestamp"] for item in first["items"]]
    assert stamps == sorted(stamps, reverse=True)  # newest first
    last = _history(seeded, "admin", "?per_page=10&page=4")
    assert len(last["items"]) == 3
    beyond = _history(seeded, "admin", "?per_page=10&page=5")
    assert beyond["items"] == [] and beyond["total"] == 33
    assert len(_history(seeded, "admin", "?per_page=100")["items"]) == 33
    ids = [
        i["id"]
        for p in range(1, 5)
        for i in _history(seeded, "admin", f"?per_page=10&page={p}")["items"]
    ]
    assert len(set(ids)) == 33
    for bad in ("?per_page=101", "?per_page=0", "?page=0", "?page=x"):
        response = seeded.client.get(f"/api/v1/history{bad}", headers=seeded.headers("admin"))
        assert response.status_code == 422, bad
        assert response.json["error"]["code"] == "validation_error"


def test_empty_history(api: API) -> None:
    body = _history(api, "viewer")
    assert body == {"items": [], "total": 0, "page": 1, "per_page": 20, "pages": 0}


def test_filters(seeded: API) -> None:
    assert _history(seeded, "admin", "?source=dicom")["total"] == 5
    assert _history(seeded, "admin", "?class=Adenocarcinoma")["total"] == 5
    assert _history(seeded, "admin", "?study_uid=1.2.3.4")["total"] == 5
    window = "?date_from=2026-02-01T00:00:00Z&date_to=2026-02-01T00:03:00Z"
    assert _history(seeded, "admin", window)["total"] == 3
    naive = "?date_from=2026-03-01T00:00:00"
    assert _history(seeded, "admin", naive)["total"] == 3
    bad = seeded.client.get("/api/v1/history?source=fax", headers=seeded.headers("admin"))
    assert bad.status_code == 422


def test_visibility(seeded: API) -> None:
    assert _history(seeded, "radiologist")["total"] == 30  # own 25 + 5 DICOM
    assert _history(seeded, "viewer")["total"] == 5  # DICOM only
    own_by_admin = _history(seeded, "admin", "?source=upload&per_page=3")["items"][0]["id"]
    hidden = seeded.client.get(
        f"/api/v1/history/{own_by_admin}", headers=seeded.headers("radiologist")
    )
    assert hidden.status_code == 404
    dicom = _history(seeded, "viewer")["items"][0]
    detail = seeded.client.get(f"/api/v1/history/{dicom['id']}", headers=seeded.headers("viewer"))
    assert detail.status_code == 200 and detail.json["heatmap_urls"] == []


def test_stats(seeded: API) -> None:
    response = seeded.client.get("/api/v1/stats?days=366", headers=seeded.headers("admin"))
    assert response.status_code == 200
    body = response.json
    assert body["total"] == 33
    assert body["by_source"] == {"upload": 28, "dicom": 5}
    assert body["class_distribution"] == {"Normal": 28, "Adenocarcinoma": 5}
    assert body["mean_processing_time"] == pytest.approx(0.1)
    assert set(body["queue"]["jobs"]) == {"queued", "running", "done", "failed"}
    assert set(body["queue"]["deliveries"]) == {"pending", "done", "dead", "sent", "committed"}
    viewer = seeded.client.get("/api/v1/stats", headers=seeded.headers("viewer")).json
    assert viewer["total"] == 5
    assert (
        seeded.client.get("/api/v1/stats?days=0", headers=seeded.headers("admin")).status_code
        == 422
    )


def test_per_day_counts(api: API) -> None:
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    api.add_predictions(2, start=today)
    api.add_predictions(1, start=today - timedelta(days=1))
    api.add_predictions(1, start=today - timedelta(days=40))
    body = api.client.get("/api/v1/stats?days=7", headers=api.headers("admin")).json
    assert [d["count"] for d in body["per_day"]] == [1, 2]
    assert body["per_day"][1]["date"] == today.date().isoformat()


def test_delete_removes_row_files_and_is_audited(api: API) -> None:
    storage = api.settings.storage_dir
    image = storage / "uploads" / ("a" * 32 + ".png")
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    heatmaps = storage / "heatmaps" / "1"
    heatmaps.mkdir(parents=True)
    (heatmaps / "0.png").write_bytes(b"png")
    outside = storage.parent / "outside.txt"
    outside.write_text("keep me")
    (pid,) = api.add_predictions(
        1, user_id=api.users["radiologist"], image_path=str(image), heatmap_path=str(heatmaps)
    )
    (foreign,) = api.add_predictions(1, source="dicom", image_path=str(outside))
    radiologist = api.headers("radiologist")
    forbidden = api.client.delete(f"/api/v1/history/{foreign}", headers=radiologist)
    assert forbidden.status_code == 403
    assert (
        api.client.delete(f"/api/v1/history/{pid}", headers=api.headers("viewer")).status_code
        == 403
    )
    response = api.client.delete(f"/api/v1/history/{pid}", headers=radiologist)
    assert response.status_code == 204 and response.data == b""
    assert not image.exists() and not heatmaps.exists()
    assert api.client.get(f"/api/v1/history/{pid}", headers=radiologist).status_code == 404
    assert api.client.delete(f"/api/v1/history/{pid}", headers=radiologist).status_code == 404
    # An admin may delete a DICOM result; files outside the API's folders stay.
    assert (
        api.client.delete(f"/api/v1/history/{foreign}", headers=api.headers("admin")).status_code
        == 204
    )
    assert outside.read_text() == "keep me"
    with api.app.extensions["lungnode"]["sessions"]() as session:
        events = session.query(AuditEvent).filter_by(action="prediction.delete").all()
        assert sorted(e.target for e in events) == sorted([str(pid), str(foreign)])
        assert session.query(Prediction).count() == 0


def test_heatmap_and_download_errors(seeded: API) -> None:
    headers = seeded.headers("admin")
    assert seeded.client.get("/api/v1/heatmaps/1/0.png", headers=headers).status_code == 404
    assert seeded.client.get("/api/v1/heatmaps/999/0.png", headers=headers).status_code == 404
    assert seeded.client.get("/api/v1/download/999", headers=headers).status_code == 404
    assert seeded.client.get("/api/v1/download/1").status_code == 401
    with seeded.client.get("/api/v1/download/1", headers=headers) as response:
        assert response.status_code == 200 and response.data.startswith(b"%PDF")
        assert "attachment" in response.headers["Content-Disposition"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/history/{id}"),
        ("delete", "/history/{id}"),
        ("get", "/heatmaps/{id}/0.png"),
        ("get", "/download/{id}"),
        ("post", "/jobs/{id}/retry"),
        ("post", "/deliveries/{id}/retry"),
        ("patch", "/users/{id}"),
    ],
)
def test_an_id_beyond_the_id_columns_is_not_found(api: API, method: str, path: str) -> None:
    """Ids are SQL INTEGER (32 bits on PostgreSQL, which refuses a larger number with an
    error): one beyond that range names no row, 404 like any other unknown id."""
    for number in (2**31 - 1, 2**31, 2**63):
        response = getattr(api.client, method)(
            f"/api/v1{path.format(id=number)}", headers=api.headers("admin"), json={}
        )
        assert response.status_code == 404, (number, response.json)
        assert response.json["error"]["code"] == "not_found"


def test_versions_of_a_series_both_listed_the_newer_current(api: API) -> None:
    """A late instance reopens a series; its second analysis supersedes the first."""
    with api.app.extensions["lungnode"]["sessions"].begin() as session:
        series = Series(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", state="done")
        session.add(series)
        session.flush()
        jobs = [Job(series_id=series.id, version=v, state="done") for v in (1, 2)]
        session.add_all(jobs)
        session.flush()
        job_ids = [job.id for job in jobs]
    first, second = (
        api.add_predictions(
            1,
            source="dicom",
            job_id=job_id,
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4",
            start=datetime(2026, 1, 1, minute, tzinfo=UTC),
        )[0]
        for minute, job_id in zip((1, 2), job_ids, strict=True)
    )
    (upload,) = api.add_predictions(1)
    items = {item["id"]: item for item in _history(api, "admin")["items"]}
    assert (items[first]["analysis_version"], items[first]["current"]) == (1, False)
    assert (items[second]["analysis_version"], items[second]["current"]) == (2, True)
    assert (items[upload]["analysis_version"], items[upload]["current"]) == (None, True)
    detail = api.client.get(f"/api/v1/history/{first}", headers=api.headers("admin")).json
    assert (detail["analysis_version"], detail["current"]) == (1, False)
