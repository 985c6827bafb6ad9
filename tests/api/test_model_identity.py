"""The model's identity is recorded on the prediction when it is made; every later
output reads it there, so a bundle changed or removed since cannot drop the
synthetic-model notice."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from lungnode.db.models import Prediction
from tests.api.conftest import API, png_bytes, upload_form
from tests.conftest import require_tool

NOTICE = "Trained on synthetic phantoms"


def _report_text(api: API, prediction_id: int, tmp_path: Path) -> str:
    with api.client.get(
        f"/api/v1/download/{prediction_id}", headers=api.headers("radiologist")
    ) as response:
        assert response.status_code == 200, response.json
        pdf = tmp_path / f"report-{prediction_id}.pdf"
        pdf.write_bytes(response.data)
    return subprocess.run(
        [require_tool("pdftotext"), str(pdf), "-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_synthetic_notice_survives_a_changed_or_removed_bundle(
    make_api: Callable[..., API], tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    api = make_api(model="tiny", models_dir=tmp_path / "models")
    response = api.client.post(
        "/api/v1/predict",
        data=upload_form(png_bytes(64)),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    prediction_id = response.json["prediction_id"]
    assert response.json["model"]["synthetic"] is True
    with api.app.extensions["lungnode"]["sessions"]() as session:
        row = session.get(Prediction, prediction_id)
        assert row is not None and row.model_synthetic is True
        assert row.model_trained_on == "nothing: random weights"
        assert row.model_intended_use == "API tests"

    # The same name and version on disk now claim a model trained on patients.
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(synthetic=False, trained_on="patients", intended_use="clinical")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    text = _report_text(api, prediction_id, tmp_path)
    assert NOTICE in text and "random weights" in text and "patients" not in text
    detail = api.client.get(f"/api/v1/history/{prediction_id}", headers=api.headers("admin"))
    assert detail.json["model"]["synthetic"] is True
    assert detail.json["model"]["trained_on"] == "nothing: random weights"

    # The bundle is gone, and the report is built again.
    shutil.rmtree(bundle)
    (api.settings.storage_dir / "reports" / f"{prediction_id}.pdf").unlink()
    assert NOTICE in _report_text(api, prediction_id, tmp_path)


def test_a_row_without_a_recorded_identity_is_never_reported_as_not_synthetic(
    api: API, tmp_path: Path
) -> None:
    """Rows from before the identity was kept: the notice, and that it was not recorded."""
    (prediction_id,) = api.add_predictions(1, user_id=api.users["radiologist"])
    text = " ".join(_report_text(api, prediction_id, tmp_path).split())
    assert NOTICE in text
    assert "Model identity not recorded" in text
    detail = api.client.get(f"/api/v1/history/{prediction_id}", headers=api.headers("admin"))
    assert detail.status_code == 200
    assert detail.json["model"]["synthetic"] is None
