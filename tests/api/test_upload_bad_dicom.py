"""What the upload store makes of DICOM files the bad-input corpus drill
(tests/drills/test_corpus.py) sends it.

- pydicom-data's ``bad_sequence.dcm`` is a CT image whose UIDs are 64
  hexadecimal characters: the DICOM receiver refuses it (0xC002), while
  ``POST /predict`` analyses it, as any CT image, and recorded those non-UIDs
  on the prediction. A UID over 64 characters, the column's size (PS3.5 9.1),
  then failed the insert on PostgreSQL: a 500 for a bad file, on ``/predict``
  and ``/batch-predict`` alike. Only valid UIDs are recorded now.
- A DICOM file without pixel data (an SR, a DICOMDIR, an RT Plan) answered 415
  "neither a PNG or JPEG image nor a DICOM image", which reads as if the file
  were not DICOM at all; the message now says it has no pixel data and names
  its SOP class.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from lungnode.db.models import BatchItem, Prediction
from tests.api.conftest import API, dicom_bytes, upload_form

LONG = "1.2." + "3" * 80  # digits and dots, but 84 characters
HEX = "05fa52f0e599f17b8186ff18fcdf2b5570a52206a75c4d03afebf5c475dc8758"  # bad_sequence.dcm's

# pydicom warns when it reads or sets such a value; the node goes on regardless.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR UI", "ignore:The value length .* allowed for VR UI"
)


def _with_uids(tmp_path: Path, study: str, series: str) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(("study", "series"), [(LONG, LONG), (HEX, "1.2.3.4")])
def test_a_ct_upload_with_bad_uids_is_predicted_without_them(
    model_api: API, tmp_path: Path, study: str, series: str
) -> None:
    api = model_api
    response = api.client.post(
        "/api/v1/predict",
        data=upload_form(_with_uids(tmp_path, study, series), filename="ct.dcm"),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    with api.app.extensions["lungnode"]["sessions"]() as session:
        row = session.get(Prediction, response.json["prediction_id"])
        assert row is not None
        assert row.study_instance_uid is None
        assert row.series_instance_uid == (None if series == LONG else series)


def test_a_batch_item_with_too_long_uids_is_predicted(model_api: API, tmp_path: Path) -> None:
    api = model_api
    response = api.client.post(
        "/api/v1/batch-predict",
        data={"file": [(io.BytesIO(_with_uids(tmp_path, LONG, LONG)), "ct.dcm")]},
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    assert [item["ok"] for item in response.json["items"]] == [True]
    with api.app.extensions["lungnode"]["sessions"]() as session:
        item = session.query(BatchItem).one()
        assert (item.study_instance_uid, item.series_instance_uid) == (None, None)


@pytest.mark.parametrize(
    ("name", "sop_class"),
    [("test-SR.dcm", "Comprehensive SR Storage"), ("rtplan.dcm", "RT Plan Storage")],
)
def test_dicom_without_pixel_data_is_415_saying_so(api: API, name: str, sop_class: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    response = api.client.post(
        "/api/v1/upload",
        data=upload_form(Path(str(path)).read_bytes(), filename=name),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 415
    error = response.json["error"]
    assert error["code"] == "unsupported_media_type"
    assert error["message"] == f"the DICOM file ({sop_class}) has no pixel data: it is not an image"


def test_a_file_that_is_not_dicom_is_415_saying_so(api: API) -> None:
    response = api.client.post(
        "/api/v1/upload",
        data=upload_form(b"{}" * 200, filename="x.json"),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 415
    assert response.json["error"]["message"] == (
        "the file is neither a PNG or JPEG image nor a readable DICOM file"
    )
