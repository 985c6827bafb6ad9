"""DICOM that is not CT (or has no Hounsfield units) answers 422 ``not_ct``, on every predict route.

pydicom's own test images: MR_small.dcm (Modality MR) was classified as lung
CT with 201; SC_rgb_rle.dcm (an RGB Secondary Capture, Modality OT) answered
422 only because its colour pixels failed to decode. CT_small.dcm is CT.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from lungnode.db.models import Prediction
from tests.api.conftest import API, upload_form


def _bytes(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path)).read_bytes()


@pytest.mark.parametrize(("name", "modality"), [("MR_small.dcm", "MR"), ("SC_rgb_rle.dcm", "OT")])
def test_predict_refuses_dicom_that_is_not_ct(model_api: API, name: str, modality: str) -> None:
    api = model_api
    response = api.client.post(
        "/api/v1/predict",
        data=upload_form(_bytes(name), filename=name),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 422, response.json
    error = response.json["error"]
    assert error["code"] == "not_ct"
    assert error["message"].startswith(f"Modality {modality} is not CT")
    assert "Hounsfield units" in error["message"]
    assert error["details"] == {"modality": modality}
    with api.app.extensions["lungnode"]["sessions"]() as session:
        assert session.query(Prediction).count() == 0


def test_an_upload_that_is_not_ct_is_refused_at_predict_by_file_id(model_api: API) -> None:
    api = model_api
    headers = api.headers("admin")
    stored = api.client.post(
        "/api/v1/upload",
        data=upload_form(_bytes("MR_small.dcm"), filename="mr.dcm"),
        headers=headers,
        content_type="multipart/form-data",
    )
    assert stored.status_code == 201
    response = api.client.post(
        "/api/v1/predict", json={"file_id": stored.json["file_id"]}, headers=headers
    )
    assert response.status_code == 422 and response.json["error"]["code"] == "not_ct"


def test_ct_is_still_classified(model_api: API) -> None:
    api = model_api
    response = api.client.post(
        "/api/v1/predict",
        data=upload_form(_bytes("CT_small.dcm"), filename="ct.dcm"),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json


def test_batch_predict_refuses_each_item_that_is_not_ct(model_api: API) -> None:
    api = model_api
    files = [
        (io.BytesIO(_bytes("MR_small.dcm")), "mr.dcm"),
        (io.BytesIO(_bytes("CT_small.dcm")), "ct.dcm"),
        (io.BytesIO(_bytes("SC_rgb_rle.dcm")), "sc.dcm"),
    ]
    response = api.client.post(
        "/api/v1/batch-predict",
        data={"file": files},
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    body = response.json
    assert body["status"] == "partial"
    assert [item["ok"] for item in body["items"]] == [False, True, False]
    assert [item["error"]["code"] for item in body["items"] if not item["ok"]] == [
        "not_ct",
        "not_ct",
    ]
    assert "Modality MR" in body["items"][0]["error"]["message"]
