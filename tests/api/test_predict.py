"""POST /predict and /batch-predict with a tiny Keras bundle; heatmaps, reports, rows."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from lungnode.db.models import AuditEvent, BatchPrediction, Prediction
from tests.api.conftest import API, dicom_bytes, png_bytes, upload_form


def _upload(api: API, content: bytes) -> str:
    response = api.client.post(
        "/api/v1/upload",
        data=upload_form(content),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    return str(response.json["file_id"])


def test_predict_a_file(model_api: API) -> None:
    api = model_api
    headers = api.headers("radiologist")
    response = api.client.post(
        "/api/v1/predict",
        data=upload_form(png_bytes(128)),
        headers=headers,
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    body = response.json
    assert sum(body["confidence_scores"].values()) == pytest.approx(1.0, abs=1e-4)
    # An untrained model is sure of nothing: no class reaches the rule's threshold.
    assert max(body["confidence_scores"].values()) < 0.8
    assert body["prediction"] == "Indeterminate" and body["confidence"] is None
    assert body["model"]["name"] == "tiny" and body["model"]["synthetic"] is True
    assert body["processing_time"] > 0
    pid = body["prediction_id"]
    assert body["heatmap_url"] == f"/api/v1/heatmaps/{pid}/0.png"
    with api.client.get(body["heatmap_url"], headers=headers) as heatmap:
        assert heatmap.status_code == 200 and heatmap.mimetype == "image/png"
        assert Image.open(io.BytesIO(heatmap.data)).size == (128, 128)
    assert (api.settings.storage_dir / "heatmaps" / str(pid) / "0.png").is_file()
    with api.app.extensions["lungnode"]["sessions"]() as session:
        row = session.get(Prediction, pid)
        assert row is not None
        assert row.source == "upload" and row.user_id == api.users["radiologist"]
        assert row.model_sha256 and row.processing_time
        assert session.query(AuditEvent).filter_by(action="prediction.create").count() == 1
    # The report is built on demand, then served from storage.
    with api.client.get(body["report_url"], headers=headers) as pdf:
        assert pdf.status_code == 200 and pdf.mimetype == "application/pdf"
        assert pdf.data.startswith(b"%PDF")
    report = api.settings.storage_dir / "reports" / f"{pid}.pdf"
    assert report.is_file()
    with api.client.get(body["report_url"], headers=headers) as again:
        assert again.data == report.read_bytes()


def test_predict_by_file_id_json_and_form(model_api: API, tmp_path: Path) -> None:
    api = model_api
    headers = api.headers("admin")
    file_id = _upload(api, png_bytes(64))
    by_json = api.client.post("/api/v1/predict", json={"file_id": file_id}, headers=headers)
    assert by_json.status_code == 201, by_json.json
    by_form = api.client.post(
        "/api/v1/predict",
        data={"file_id": file_id},
        headers=headers,
        content_type="multipart/form-data",
    )
    assert by_form.status_code == 201
    dicom_id = _upload(api, dicom_bytes(tmp_path))
    by_dicom = api.client.post("/api/v1/predict", json={"file_id": dicom_id}, headers=headers)
    assert by_dicom.status_code == 201, by_dicom.json
    detail = api.client.get(f"/api/v1/history/{by_dicom.json['prediction_id']}", headers=headers)
    assert detail.json["study_instance_uid"]  # read from the DICOM upload


def test_predict_errors(model_api: API) -> None:
    api = model_api
    headers = api.headers("radiologist")
    file_id = _upload(api, png_bytes())

    def post(**kwargs: object) -> tuple[int, str]:
        response = api.client.post("/api/v1/predict", headers=headers, **kwargs)  # type: ignore[arg-type]
        return response.status_code, response.json["error"]["code"]

    assert post(json={}) == (422, "validation_error")
    assert post(json={"file_id": file_id, "extra": 1}) == (422, "validation_error")
    assert post(json={"file_id": "0" * 32}) == (404, "not_found")
    assert post(json={"file_id": "../../etc/passwd"}) == (404, "not_found")
    assert post(data={}, content_type="multipart/form-data") == (422, "validation_error")
    both = {**upload_form(png_bytes()), "file_id": file_id}
    assert post(data=both, content_type="multipart/form-data") == (422, "validation_error")
    fake = upload_form(b"\x89PNG\r\n\x1a\nnope")
    assert post(data=fake, content_type="multipart/form-data") == (415, "unsupported_media_type")
    assert post(data="x", content_type="application/json") == (400, "bad_request")
    tiny = upload_form(png_bytes(size=8))
    assert post(data=tiny, content_type="multipart/form-data") == (422, "image_too_small")
    viewer = api.client.post(
        "/api/v1/predict", json={"file_id": file_id}, headers=api.headers("viewer")
    )
    assert viewer.status_code == 403


def test_model_unavailable_is_503(api: API) -> None:
    file_id = _upload(api, png_bytes())
    response = api.client.post(
        "/api/v1/predict", json={"file_id": file_id}, headers=api.headers("admin")
    )
    assert response.status_code == 503
    assert response.json["error"]["code"] == "model_unavailable"


def test_batch_predict_one_bad_item_does_not_fail_the_batch(model_api: API) -> None:
    api = model_api
    headers = api.headers("radiologist")
    files = [
        (io.BytesIO(png_bytes(seed=1)), "a.png"),
        (io.BytesIO(b"not an image"), "b.png"),
        (io.BytesIO(png_bytes(seed=2)), "c.png"),
    ]
    response = api.client.post(
        "/api/v1/batch-predict",
        data={"file": files, "batch_name": "three"},
        headers=headers,
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    body = response.json
    assert body["status"] == "partial" and body["batch_name"] == "three"
    assert [item["ok"] for item in body["items"]] == [True, False, True]
    assert body["items"][1]["error"]["code"] == "unsupported_media_type"
    with api.app.extensions["lungnode"]["sessions"]() as session:
        batch = session.get(BatchPrediction, body["batch_id"])
        assert batch is not None and batch.status == "partial"
        assert session.query(Prediction).filter_by(batch_id=batch.id).count() == 2


def test_batch_predict_by_ids_json(model_api: API) -> None:
    api = model_api
    ids = [_upload(api, png_bytes(seed=s)) for s in range(2)]
    response = api.client.post(
        "/api/v1/batch-predict",
        json={"file_ids": [*ids, "f" * 32]},
        headers=api.headers("admin"),
    )
    assert response.status_code == 201
    items = response.json["items"]
    assert [i["ok"] for i in items] == [True, True, False]
    assert items[2]["error"]["code"] == "not_found" and items[0]["file_id"] == ids[0]


@pytest.mark.parametrize("count", [0, 11])
def test_batch_size_limits_are_422(api: API, count: int) -> None:
    files = [(io.BytesIO(png_bytes(16, seed=i)), f"{i}.png") for i in range(count)]
    response = api.client.post(
        "/api/v1/batch-predict",
        data={"file": files},
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 422
    assert response.json["error"]["details"]["given"] == count
    too_many = api.client.post(
        "/api/v1/batch-predict",
        json={"file_ids": ["a" * 32] * 11},
        headers=api.headers("radiologist"),
    )
    assert too_many.status_code == 422


def test_batch_limit_follows_the_setting(make_api: Callable[..., API]) -> None:
    api = make_api(max_batch_size=2)
    response = api.client.post(
        "/api/v1/batch-predict",
        json={"file_ids": ["a" * 32] * 3},
        headers=api.headers("admin"),
    )
    assert response.status_code == 422
    assert response.json["error"]["details"]["max_batch_size"] == 2
