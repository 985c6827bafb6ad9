"""``/batch-predict`` and ``GET /batches/<id>``: a batch and its items are rows.

- Embedded (no queue): 201 with every result, and a ``poll_url`` that shows the
  same batch later.
- With a queue (``create_app(batch_queue=...)``, what ``lungnode.app.wsgi``
  gives the ``api`` role on Celery): 202 at once with the pending items, their
  ids handed to the queue; the API needs no model for it. The items then run
  wherever ``pipeline.batches.run_batch_item`` runs, with no Flask app at all,
  and the poll URL shows their results.
- A batch is its owner's: another radiologist or a viewer gets 404, an admin sees it.

The real workers on Redis run in ``tests/scaled/test_batch_predict.py``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest

from lungnode.db.batches import BatchItems
from lungnode.db.models import BatchItem, Prediction, Role
from lungnode.db.session import make_engine, make_session_factory
from lungnode.errors import ItemNotRunning
from lungnode.ml.bundle import load_bundle
from lungnode.pipeline.batches import ItemTerms, give_up_lost_item, run_batch_item
from lungnode.pipeline.upload_prediction import StoredUpload, predict_upload
from tests.api.conftest import API, PASSWORD, png_bytes


def _files(*contents: bytes) -> list[tuple[io.BytesIO, str]]:
    return [(io.BytesIO(content), f"{k}.png") for k, content in enumerate(contents)]


def _post_batch(api: API, role: str = "radiologist", **data: object) -> tuple[int, dict, str]:
    response = api.client.post(
        "/api/v1/batch-predict",
        data={"file": _files(png_bytes(seed=1), b"not an image", png_bytes(seed=2)), **data},
        headers=api.headers(role),
        content_type="multipart/form-data",
    )
    return response.status_code, response.json, response.headers.get("Location", "")


def test_embedded_batch_answers_201_and_its_poll_url_shows_it_again(model_api: API) -> None:
    api = model_api
    status, body, location = _post_batch(api, batch_name="three")
    assert status == 201, body
    assert body["poll_url"] == f"/api/v1/batches/{body['batch_id']}" == location
    assert body["status"] == "partial"
    assert [i["state"] for i in body["items"]] == ["done", "failed", "done"]
    assert [i["ok"] for i in body["items"]] == [True, False, True]
    polled = api.client.get(location, headers=api.headers("radiologist"))
    assert polled.status_code == 200
    assert polled.json == body
    # A prediction of the batch deleted: its item stays done, without a result.
    prediction_id = body["items"][0]["result"]["prediction_id"]
    deleted = api.client.delete(
        f"/api/v1/history/{prediction_id}", headers=api.headers("radiologist")
    )
    assert deleted.status_code == 204
    after = api.client.get(location, headers=api.headers("radiologist")).json
    assert after["items"][0]["state"] == "done" and after["items"][0]["result"] is None
    assert after["items"][2] == body["items"][2]


def test_a_batch_is_seen_by_its_owner_and_admins_only(model_api: API) -> None:
    api = model_api
    api.add_user("other", Role.RADIOLOGIST)
    status, body, location = _post_batch(api)
    assert status == 201
    assert api.client.get(location, headers=api.headers("admin")).status_code == 200
    other = api.client.post("/api/v1/auth/login", json={"username": "other", "password": PASSWORD})
    token = other.json["access_token"]
    hidden = api.client.get(location, headers={"Authorization": f"Bearer {token}"})
    assert hidden.status_code == 404 and hidden.json["error"]["code"] == "not_found"
    assert api.client.get(location, headers=api.headers("viewer")).status_code == 404
    assert api.client.get(location).status_code == 401
    missing = f"/api/v1/batches/{body['batch_id'] + 1}"
    assert api.client.get(missing, headers=api.headers("admin")).status_code == 404


def test_with_a_queue_the_batch_answers_202_and_the_items_run_elsewhere(
    make_api: Callable[..., API], tiny_bundle: Path
) -> None:
    """The API hands the pending items to its queue and answers at once, with no
    model of its own; run_batch_item, outside any Flask app, then predicts them."""
    queued: list[int] = []
    api = make_api(batch_queue=queued.extend)  # model "no-such-model": none needed here
    status, body, location = _post_batch(api)
    assert status == 202, body
    assert location == body["poll_url"]
    assert body["status"] == "pending"
    assert [i["state"] for i in body["items"]] == ["pending", "failed", "pending"]
    assert [i["ok"] for i in body["items"]] == [None, False, None]
    assert body["items"][1]["error"]["code"] == "unsupported_media_type"
    sessions = api.app.extensions["lungnode"]["sessions"]
    with sessions() as session:
        items = session.query(BatchItem).order_by(BatchItem.position).all()
        assert queued == [items[0].id, items[2].id]
        assert session.query(Prediction).count() == 0

    # A worker's view: its own engine and the settings, no Flask.
    engine = make_engine(api.settings.effective_database_url)
    try:
        worker_sessions = make_session_factory(engine)
        bundle = load_bundle(str(tiny_bundle), api.settings.models_dir)
        terms = ItemTerms.from_settings(api.settings)
        for item_id in queued:
            recorded = run_batch_item(
                BatchItems(worker_sessions),
                item_id,
                lambda: bundle,
                api.settings,
                worker_sessions,
                terms,
            )
            assert recorded is not None
        # A second message for the same item (a re-send) finds nothing to do.
        again = run_batch_item(
            BatchItems(worker_sessions),
            queued[0],
            lambda: bundle,
            api.settings,
            worker_sessions,
            terms,
        )
        assert again is None
    finally:
        engine.dispose()
    polled = api.client.get(location, headers=api.headers("radiologist")).json
    assert polled["status"] == "partial"
    assert [i["state"] for i in polled["items"]] == ["done", "failed", "done"]
    results = [polled["items"][k]["result"] for k in (0, 2)]
    for result in results:
        heatmap = api.client.get(result["heatmap_url"], headers=api.headers("radiologist"))
        heatmap.close()
        assert heatmap.status_code == 200 and heatmap.mimetype == "image/png"
    with sessions() as session:
        rows = session.query(Prediction).all()
        assert sorted(row.id for row in rows) == sorted(r["prediction_id"] for r in results)
        assert {row.batch_id for row in rows} == {polled["batch_id"]}
        assert {row.user_id for row in rows} == {api.users["radiologist"]}


def test_the_late_result_of_a_lost_attempt_is_not_recorded(
    make_api: Callable[..., API], tiny_bundle: Path
) -> None:
    """A worker whose lease ran out (its item given to another, which finished it)
    records nothing when its result comes at last: no second prediction, no heatmaps."""
    queued: list[int] = []
    api = make_api(batch_queue=queued.extend)
    response = api.client.post(
        "/api/v1/batch-predict",
        data={"file": _files(png_bytes(seed=3))},
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 202
    (item_id,) = queued
    settings = api.settings
    sessions = api.app.extensions["lungnode"]["sessions"]
    items = BatchItems(sessions)
    bundle = load_bundle(str(tiny_bundle), settings.models_dir)
    terms = ItemTerms.from_settings(settings)
    slow = items.claim(item_id, terms.lease_seconds)
    assert slow is not None
    assert give_up_lost_item(items, item_id, slow.attempt, terms, "lease ran out")
    assert run_batch_item(items, item_id, lambda: bundle, settings, sessions, terms) is not None
    upload = StoredUpload(slow.file_id or "", settings.resolve_stored(slow.image_path), slow.kind)
    with pytest.raises(ItemNotRunning):
        predict_upload(
            upload,
            bundle,
            settings,
            sessions,
            slow.user_id,
            slow.batch_id,
            on_record=lambda session, prediction: items.record_done(session, slow, prediction.id),
        )
    with sessions() as session:
        (prediction,) = session.query(Prediction).all()
        item = session.get(BatchItem, item_id)
        assert item is not None and item.prediction_id == prediction.id and item.attempts == 2
    heatmaps = settings.storage_dir / "heatmaps"
    assert [p.name for p in heatmaps.iterdir()] == [str(prediction.id)]


def test_with_a_queue_a_batch_of_refused_items_is_failed_at_once(
    make_api: Callable[..., API],
) -> None:
    queued: list[int] = []
    api = make_api(batch_queue=queued.extend)
    response = api.client.post(
        "/api/v1/batch-predict",
        json={"file_ids": ["f" * 32, "e" * 32]},
        headers=api.headers("admin"),
    )
    assert response.status_code == 202, response.json
    assert response.json["status"] == "failed" and queued == []
    assert {i["error"]["code"] for i in response.json["items"]} == {"not_found"}


def test_the_openapi_document_has_the_202_and_the_poll_endpoint(api: API) -> None:
    spec = api.client.get("/api/v1/openapi.json").json
    batch = spec["paths"]["/api/v1/batch-predict"]["post"]["responses"]
    assert {"201", "202"} <= batch.keys()
    assert batch["202"]["content"] == batch["201"]["content"]
    assert "Location" in batch["202"]["headers"]
    assert "/api/v1/batches/{batch_id}" in spec["paths"]
